"""The memory plan of a QLoRA run, from the model's config.json alone (no weights loaded).

    python tools/plan_memory.py --model llama-3.1-70b --gpu_memory 24GiB --max_seq_length 4096
    python tools/plan_memory.py --model meta-llama/Llama-3.1-8B-Instruct --gpu_memory 24GiB --json

Prints the budget table (or JSON with --json); exit code 0 when the plan fits, 1 when it does not.
The logic lives in qlora_kit/memory/ (apply.plan_command).
"""

import sys

from qlora_kit.errors import exit_on_user_error
from qlora_kit.memory.apply import plan_command

if __name__ == "__main__":
    sys.exit(exit_on_user_error(plan_command)(sys.argv[1:]))
