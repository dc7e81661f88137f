"""python tools/measure_stream_load.py [--layers N --vocab V] [--cache] [--out FILE]: the streaming loader's peak RAM.

The measurement and its options: qlora_kit/model/measure_load.py (`--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_kit.model.measure_load import main  # noqa: E402

if __name__ == "__main__":
    main()
