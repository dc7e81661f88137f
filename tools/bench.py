#!/usr/bin/env python
"""python tools/bench.py --model PATH|config.json [--seq_len 512 --batch_size 4 --steps 8 --repeats 2] [--out F]

Side by side: the standard transformers + peft + bitsandbytes QLoRA loop vs qlora_kit, each run in
its own subprocess, interleaved, after a warm-up; prints a table of medians and ratios and the JSON.
The logic lives in qlora_kit/bench/training.py.
"""

import argparse
import dataclasses
import json
from pathlib import Path


from qlora_kit.bench.training import BenchSettings, compare, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(BenchSettings):
        default = None if field.default is dataclasses.MISSING else field.default
        parser.add_argument(f"--{field.name}", type=str if default is None else type(default),
                            default=default, required=default is None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved")
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    args = vars(parser.parse_args())
    repeats, out = args.pop("repeats"), args.pop("out")
    summary = compare(BenchSettings(**args), repeats=repeats)
    print(format_table(summary))
    text = json.dumps(summary, indent=1)
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
