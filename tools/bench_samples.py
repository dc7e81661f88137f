"""python tools/bench_samples.py [--prompts 3] [--max_new_tokens 64] [--eval_examples N] [--out FILE]:
what the sample replies cost at an eval, against a training step and the eval loss, on the demo run.

The measurement and its options: qlora_kit/bench/samples_cost.py (`--help`).
"""

from qlora_kit.bench.samples_cost import main

if __name__ == "__main__":
    main()
