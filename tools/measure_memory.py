"""Peak GPU memory of training steps, measured, next to the memory planner's prediction.

    python tools/measure_memory.py --out memory.json            # on a GPU: demo shape and Llama-3.1-8B
    python tools/measure_memory.py --tiny --out memory.json     # anywhere: shrunk shapes on the CPU

For each model (random weights, quantized to NF4 layer by layer on the device), each sequence
length, the plain and the chunked loss, with and without activation offload: two training steps
with a fresh optimizer after resetting the peak statistics; prints a table and JSON. The logic lives
in qlora_kit/bench/memory_measure.py.
"""

import sys

from qlora_kit.errors import exit_on_user_error
from qlora_kit.log import setup_logging
from qlora_kit.bench.memory_measure import measure_command

if __name__ == "__main__":
    setup_logging()
    exit_on_user_error(measure_command)(sys.argv[1:])
