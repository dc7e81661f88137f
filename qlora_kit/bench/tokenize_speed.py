"""Tokenization throughput of the data stage: N synthetic multi-turn conversations, cold and cached.

    python tools/bench_tokenize.py [--conversations 20000] [--num_proc 2] [--out bench.json]

Writes the conversations as a .jsonl file in a fresh temporary folder, runs the data stage on it
with the demo tokenizer (SmolLM2-135M-Instruct, ChatML), once with an empty cache and once more
with the same data and tokenizer (which reads the tokenized result back), and prints JSON: wall
time, CPU time of all processes (which other work on the machine does not inflate), and the
machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Optional

from qlora_kit.config import DataArguments
from qlora_kit.data.dataset import build_datasets
from qlora_kit.bench.synthetic_data import synthetic_conversations, write_jsonl
from qlora_kit.errors import exit_on_user_error
from qlora_kit.log import setup_logging
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.sources import resolve_model


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_build(args: DataArguments, tokenizer, cache: Path) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds and the report of one run of the data stage."""
    start, cpu = time.perf_counter(), cpu_seconds()
    _, _, report = build_datasets(args, tokenizer, seed=0, cache_dir=cache)
    return time.perf_counter() - start, cpu_seconds() - cpu, vars(report)


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer (a folder or the demo name)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    options = parser.parse_args(argv)
    setup_logging()
    tokenizer = load_tokenizer(resolve_model(options.model))
    with tempfile.TemporaryDirectory() as folder:
        data = write_jsonl(synthetic_conversations(options.conversations, seed=0), Path(folder) / "chats.jsonl")
        args = DataArguments(dataset_name=str(data), max_seq_length=options.max_seq_length, eval_fraction=0.0,
                             dataset_num_proc=options.num_proc)
        cold, cold_cpu, report = timed_build(args, tokenizer, Path(folder) / "cache")
        cached, _, again = timed_build(args, tokenizer, Path(folder) / "cache")
    result = {
        "conversations": options.conversations, "num_proc": options.num_proc, "cpu_count": os.cpu_count(),
        "cold_seconds": round(cold, 2), "conversations_per_second": round(options.conversations / cold, 1),
        "cold_cpu_seconds": round(cold_cpu, 2),  # all processes; wall time on idle cores is about this / num_proc
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cached_seconds": round(cached, 2), "second_run_from_cache": again["tokenized_from_cache"],
        "tokens": report["tokens"], "trained_tokens": report["trained_tokens"], "length": report["length"],
        "under_60_seconds": cold < 60,
    }
    print(json.dumps(result, indent=2))
    if options.out:
        Path(options.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
