"""python tools/measure_stream_load.py [--layers N --vocab V] [--cache] [--out FILE]: the streaming loader's peak RAM.

The measurement and its options: qlora_kit/bench/stream_load.py (`--help`).
"""

from qlora_kit.bench.stream_load import main

if __name__ == "__main__":
    main()
