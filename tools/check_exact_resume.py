"""Does a stopped-and-resumed run match the run that never stopped, here? Prints a JSON report.

    python tools/check_exact_resume.py --out resume_cuda.json          # on a GPU: CUDA RNG, paged 8-bit AdamW
    python tools/check_exact_resume.py --tiny --out resume_cpu.json    # anywhere, a tiny model in seconds

A random-weight Llama (no weights needed) in NF4 with LoRA (dropout, gradient checkpointing) is
trained straight through, again, and resumed from the middle; see qlora_kit/bench/resilience.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from qlora_kit.log import setup_logging
from qlora_kit.bench.resilience import check_exact_resume, print_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (CPU-sized) instead of 'small'")
    parser.add_argument("--steps", type=int, default=6, help="steps straight through")
    parser.add_argument("--stop_at", type=int, default=3, help="the step whose checkpoint the resumed run starts from")
    parser.add_argument("--optim", default="paged_adamw_8bit")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    setup_logging()
    device = torch.device(args.device) if args.device else None
    with tempfile.TemporaryDirectory() as work:
        report = check_exact_resume(Path(work), size="tiny" if args.tiny else "small", steps=args.steps,
                                    stop_at=args.stop_at, optim=args.optim, device=device)
    print_report(report, args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
