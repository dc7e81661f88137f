"""python tools/bench_70b.py [--tiny] [--layers N] [--out FILE]: Llama-3.1-70B's shape at a 24 GiB cap.

The measurement and its options: qlora_kit/memory/bench_70b.py (`--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.memory.bench_70b import main  # noqa: E402

if __name__ == "__main__":
    main()
