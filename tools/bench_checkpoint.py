"""What crash safety costs: step time with the non-finite guard on against off, and a checkpoint's write and check.

    python tools/bench_checkpoint.py --out bench_checkpoint_cuda.json       # on a GPU, a random-weight small Llama
    python tools/bench_checkpoint.py --tiny --out bench_checkpoint_cpu.json  # anywhere, a tiny random Llama
    python tools/bench_checkpoint.py --model ~/.cache/qlora_kit/models/smollm2-135m-instruct  # a local model

Prints a JSON report; see measure_costs in qlora_kit/bench/resilience.py.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from qlora_kit.log import setup_logging
from qlora_kit.bench.resilience import measure_costs, write_random_llama, print_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide random Llama instead of 'small'")
    parser.add_argument("--model", default=None, help="a local HF model folder instead of a random Llama")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    setup_logging()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as work:
        model_dir = Path(args.model).expanduser() if args.model else write_random_llama(
            Path(work) / "model", "tiny" if args.tiny else "small")
        report = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
            "machine": platform.node(), "torch": torch.__version__, "model": str(args.model or ("tiny" if args.tiny else "small")),
            "optim": args.optim, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            **measure_costs(Path(work), model_dir, device, steps=args.steps, optim=args.optim,
                            batch_size=args.batch_size, max_length=args.max_length),
        }
    print_report(report, args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
