"""GPU check of the merge: an 8B-shaped random model (8 of its 32 layers by default) merged on the GPU.

    python tools/gpu_merge_check.py --out gpu_merge_check.json          # on the GPU machine
    python tools/gpu_merge_check.py --tiny                               # here, on CPU, in seconds

First checks that NF4 quantized by the merge on this device equals, bit for bit, what loading the
model with qlora_kit computes with; then writes the model to --work_dir (local disk) layer by layer,
a random r=16 adapter on every projection, and merges it (nf4 base) in a fresh process. Prints JSON:
seconds, peak GPU memory (allocated / reserved), peak host RSS against 3 x largest tensor + 1.5 GB.
The embeddings and every tensor keep their full 8B shapes; fewer layers only shorten the run, and
the report projects the full model's seconds from the bytes written.
"""

import argparse
import json
from pathlib import Path

from qlora_kit.bench.export import gpu_check

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--work_dir", default="/tmp/qlora-kit-gpu-merge", help="Scratch folder on local disk (removed after).")
parser.add_argument("--num_layers", type=int, default=8, help="Decoder layers of the 8B shape (32 is the full model).")
parser.add_argument("--tiny", action="store_true", help="A tiny model instead, for a quick run anywhere.")
parser.add_argument("--out", default=None, help="Also write the JSON report here.")

if __name__ == "__main__":
    args = parser.parse_args()
    report = gpu_check(Path(args.work_dir), args.num_layers, args.tiny)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
