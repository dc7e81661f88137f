"""Benchmark of the merge: a random 1.5B Llama in shards, merged with `original` and `nf4`, against `cp`.

    python tools/bench_export.py --work_dir /tmp/export-bench --out export-bench.json

Prints (and writes to --out) seconds, ratio to `cp -r` + `sync` of the same base folder, and the
peak RSS of each merge against 3 x the largest tensor + 1.5 GB. The work folder is removed at the end.
"""

import argparse
import json
from pathlib import Path

from qlora_kit.bench.export import run_benchmark
from qlora_kit.bench.random_model import PRESETS

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--work_dir", default="/tmp/qlora-kit-export-bench", help="Scratch folder (removed after).")
parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1.5b", help="Model shape.")
parser.add_argument("--num_layers", type=int, default=None, help="Decoder layers (default: the preset's).")
parser.add_argument("--max_shard_size", default="1GB", help="Shard size of the base and the merged model.")
parser.add_argument("--modes", default="original,nf4",
                    help="Merge bases to time, comma-separated; gguf-f16, gguf-bf16, gguf-q8_0: a GGUF export "
                    "(merge base original) of that type.")
parser.add_argument("--out", default=None, help="Also write the JSON report here.")

if __name__ == "__main__":
    args = parser.parse_args()
    report = run_benchmark(Path(args.work_dir), args.preset, args.num_layers, args.max_shard_size,
                           tuple(args.modes.split(",")))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
