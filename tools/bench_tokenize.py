"""python tools/bench_tokenize.py [--conversations 20000] [--num_proc 2] [--out FILE]: tokenization
throughput of the data stage on synthetic multi-turn conversations, cold and cached.

The measurement and its options: qlora_kit/bench/tokenize_speed.py (`--help`).
"""

from qlora_kit.bench.tokenize_speed import main

if __name__ == "__main__":
    main()
