"""python tools/measure_fsdp_load.py [--layers N --vocab V] [--processes N] [--out FILE]: the sharded loader's RAM.

Each process's peak host RAM with the FSDP2-sharded loader, against one process of the normal loader;
the measurement and its options: qlora_kit/bench/fsdp_load.py (`--help`).
"""

from qlora_kit.bench.fsdp_load import main

if __name__ == "__main__":
    main()
