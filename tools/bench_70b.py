"""python tools/bench_70b.py [--tiny] [--layers N] [--out FILE]: Llama-3.1-70B's shape at a 24 GiB cap.

The measurement and its options: qlora_kit/bench/memory_70b.py (`--help`).
"""

from qlora_kit.bench.memory_70b import main

if __name__ == "__main__":
    main()
