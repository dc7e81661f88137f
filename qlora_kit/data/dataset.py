"""The data stage: dataset names in; tokenized train and eval splits and a report out.

For each source: read it (`load.py`), tell its format (`formats.py`), tokenize it with
`datasets.map` (batched, in `dataset_num_proc` processes), and count what was kept and dropped.
The tokenized result is cached by `datasets` under a fingerprint of the data, the format, the
tokenizer, the settings and this package's data code, so a second run with the same data and
tokenizer reads it back instead of tokenizing again. Then the eval split is held out (from
--eval_dataset_name, or a seeded fraction of each source), weighted sources are mixed, and the
training examples are packed when --packing is on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets

from qlora_kit.config import DataArguments
from qlora_kit.data import fast, formats, tokenize
from qlora_kit.data.formats import check_columns, detect_format
from qlora_kit.data.load import RawPart, Source, load_source, parse_sources
from qlora_kit.data.packing import column_numpy, pack_dataset
from qlora_kit.data.report import DataReport
from qlora_kit.data.tokenize import (LENGTH_REASONS, TOKENIZED_FEATURES, TokenizeSettings, check_offsets,
                                     ensure_chat_template, tokenize_batch)
from qlora_kit.errors import UserError
from qlora_kit.log import logger, notice_once
from qlora_kit.sources import cache_dir as qlora_cache_dir

AUTO_NUM_PROC_MIN_RECORDS = 5000
MAP_BATCH_SIZE = 256


@dataclass
class PreparedSource:
    """A source's kept examples (tokenized) and its counts."""

    source: Source
    kept: Dataset
    summary: dict


def build_datasets(args: DataArguments, tokenizer, seed: int,
                   cache_dir: Optional[Path] = None) -> tuple[Dataset, Optional[Dataset], DataReport]:
    """Train and eval splits of the tokenized data, and the report of what was read, kept and dropped.

    Args:
        args: the data fields of the run.
        tokenizer: the model's tokenizer; one without a chat template gets ChatML (said once).
        seed: seeds the eval split and the mixing of weighted sources.
        cache_dir: where `datasets` keeps what it read and tokenized (default: the qlora_kit cache).
    """
    check_data_arguments(args)
    cache = Path(cache_dir) if cache_dir is not None else qlora_cache_dir() / "datasets"
    settings = TokenizeSettings(args.max_seq_length, args.assistant_only_loss, args.truncation_policy)
    report = DataReport()
    train_sources = [prepare_source(s, args, tokenizer, settings, cache, report)
                     for s in parse_sources(args.dataset_name)]
    for prepared in train_sources:
        report.sources.append(prepared.summary)
        report.examples_read += prepared.summary["read"]
        report.examples_kept += prepared.summary["kept"]
    report.tokenized_from_cache = all(p.summary["from_cache"] for p in train_sources)
    if args.eval_dataset_name:
        if args.eval_fraction:
            notice_once("--eval_dataset_name is set: --eval_fraction is not used")
        eval_sources = [prepare_source(s, args, tokenizer, settings, cache, None)
                        for s in parse_sources(args.eval_dataset_name, "--eval_dataset_name")]
        eval_data = concatenate_datasets([p.kept for p in eval_sources])
        report.sources += [p.summary for p in eval_sources]
        train_parts = [p.kept for p in train_sources]
    else:
        splits = [split_eval(p.kept, args.eval_fraction, seed) for p in train_sources]
        train_parts = [train for train, _ in splits]
        held_out = [held for _, held in splits if held is not None]
        eval_data = concatenate_datasets(held_out) if held_out else None
    train_data = mix(train_sources, train_parts, seed, report)
    report.set_training_counts(column_numpy(train_data, "length"), column_numpy(train_data, "trained"))
    report.eval_examples = len(eval_data) if eval_data is not None else 0
    if args.packing:
        train_data, fill = pack_dataset(train_data, args.max_seq_length)
        report.packed_rows, report.packing_fill = len(train_data), round(fill, 4)
    else:
        train_data = train_data.select_columns(["input_ids", "labels"])
    if eval_data is not None:
        eval_data = eval_data.select_columns(["input_ids", "labels"])
    return train_data, eval_data, report


def check_data_arguments(args: DataArguments) -> None:
    if args.dataset_num_proc is not None and args.dataset_num_proc < 1:
        raise UserError(f"--dataset_num_proc must be at least 1, got {args.dataset_num_proc}")


def prepare_source(source: Source, args: DataArguments, tokenizer, settings: TokenizeSettings, cache: Path,
                   report: Optional[DataReport]) -> PreparedSource:
    """Read, tokenize (or read back from the cache) and filter one source; count into `report`."""
    summary = {"split": "train" if report is not None else "eval", "name": source.name, "format": "", "read": 0, "kept": 0}
    kept_parts = []
    if source.weight is not None:
        summary["weight"] = source.weight
    for part in load_source(source, cache):
        fmt = args.dataset_format if args.dataset_format != "auto" else detect_format(part.dataset.features, part.where)
        check_columns(part.dataset.features, fmt, part.where)
        if fmt != "text":
            ensure_chat_template(tokenizer)
            if settings.assistant_only:
                check_offsets(tokenizer)
        tokenized, from_cache = tokenize_part(part, fmt, tokenizer, settings, cache, args.dataset_num_proc)
        kept, reasons = filter_part(tokenized, part.where, args.strict, report)
        kept_parts.append(kept)
        for reason, count in reasons.items():
            summary.setdefault("dropped", {})[reason] = summary.get("dropped", {}).get(reason, 0) + count
        summary["format"] = ",".join(filter(None, [summary["format"], fmt]))
        summary["read"] += len(tokenized)
        summary["kept"] += len(kept)
        summary["from_cache"] = summary.get("from_cache", True) and from_cache
    if summary["kept"] == 0:
        dropped = ", ".join(f"{n} {reason}" for reason, n in summary.get("dropped", {}).items())
        raise UserError(f"dataset {source.name} has no usable example after filtering (dropped: {dropped}); "
                        f"check --dataset_format, --max_seq_length and --truncation_policy")
    kept = kept_parts[0] if len(kept_parts) == 1 else concatenate_datasets(kept_parts)
    return PreparedSource(source, kept, summary)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the tokenizer's vocabulary, merges, special tokens or chat template change."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        from datasets.fingerprint import Hasher

        digest.update(Hasher.hash(tokenizer).encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.special_tokens_map], default=str).encode())
    return digest.hexdigest()


def _code_fingerprint() -> str:
    """Changes when the code that turns records into tokens changes."""
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (formats, tokenize, fast))).hexdigest()


def tokenize_part(part: RawPart, fmt: str, tokenizer, settings: TokenizeSettings, cache: Path,
                  num_proc: Optional[int]) -> tuple[Dataset, bool]:
    """Tokenize a part with `datasets.map`, or read it back from the cache; also say which happened."""
    key = json.dumps([part.fingerprint, fmt, tokenizer_fingerprint(tokenizer), asdict(settings), _code_fingerprint()])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    cache_file = cache / "tokenized" / f"{fingerprint}.arrow"
    from_cache = any(cache_file.parent.glob(f"{fingerprint}*.arrow"))
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(part.dataset) >= AUTO_NUM_PROC_MIN_RECORDS else None
    tokenized = part.dataset.map(
        tokenize_batch, batched=True, batch_size=MAP_BATCH_SIZE, num_proc=num_proc if num_proc != 1 else None,
        remove_columns=part.dataset.column_names, features=TOKENIZED_FEATURES,
        fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "settings": settings},
        new_fingerprint=fingerprint, cache_file_name=str(cache_file), load_from_cache_file=True,
        desc=f"tokenizing {part.where}",
    )
    return tokenized, from_cache


def filter_part(tokenized: Dataset, where: str, strict: bool,
                report: Optional[DataReport]) -> tuple[Dataset, dict[str, int]]:
    """The kept rows and why the others were dropped; with `strict` the first bad record is an error."""
    skip = tokenized.data.column("skip")
    reasons = {r["values"]: r["counts"] for r in pc.value_counts(skip).to_pylist() if r["values"]}
    problems = {r: n for r, n in reasons.items() if r not in LENGTH_REASONS}
    if problems:
        listed = ", ".join(f"{n} with {r}" for r, n in sorted(problems.items(), key=lambda kv: -kv[1]))
        if strict:
            first = next(i for i, r in enumerate(skip.to_pylist()) if r and r not in LENGTH_REASONS)
            raise UserError(f"{where} record {first + 1}: {skip[first].as_py()} (--strict; {sum(problems.values())} "
                            f"records have problems: {listed}); fix them, or drop --strict to skip them")
        logger.info(f"skipped {sum(problems.values())} of {len(tokenized)} records of {where}: {listed} "
                    f"(--strict true stops at them instead)")
    if report is not None:
        report.add_dropped(reasons)
        report.truncated += int(pc.sum(tokenized.data.column("truncated").cast("int64")).as_py() or 0)
        report.prefix_only += int(pc.sum(tokenized.data.column("prefix_only").cast("int64")).as_py() or 0)
        report.context_replies += int(pc.sum(tokenized.data.column("context_replies")).as_py() or 0)
    if not reasons:
        return tokenized, reasons
    return tokenized.select(np.flatnonzero(pc.equal(skip, "").to_numpy(zero_copy_only=False))), reasons


def split_eval(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """A seeded random `fraction` of the examples held out for eval (none for fewer than 2 examples).

    At most half are held out, so the training split is never smaller than the eval split.
    """
    if fraction == 0 or len(dataset) < 2:
        return dataset, None
    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)
    n_eval = min(len(indices) // 2, max(1, round(fraction * len(indices))))
    return dataset.select(sorted(indices[n_eval:])), dataset.select(sorted(indices[:n_eval]))


def mix(sources: list[PreparedSource], parts: list[Dataset], seed: int, report: DataReport) -> Dataset:
    """The training examples: all sources as they are, or, with weights, each making up its weight's share.

    With weights, the mix has as many examples as the sources together; a source with more than
    its share gives a seeded random subset, one with fewer is repeated (said once).
    """
    weights = [p.source.weight for p in sources]
    total = sum(len(part) for part in parts)
    chosen = []
    for k, (prepared, part) in enumerate(zip(sources, parts)):
        if weights[0] is None:
            prepared.summary["in_training"] = len(part)
            chosen.append(part)
            continue
        target = round(weights[k] / sum(weights) * total)
        rng = np.random.default_rng([seed, k])
        repeats, rest = divmod(target, len(part))
        indices = np.concatenate([np.tile(np.arange(len(part)), repeats), np.sort(rng.choice(len(part), rest, replace=False))])
        if repeats:
            notice_once(f"{prepared.source.name}: its {len(part):,} examples are repeated to make up "
                        f"{weights[k] / sum(weights):.0%} of the training data ({target:,} examples)")
        prepared.summary["in_training"] = int(target)
        chosen.append(part.select(indices))
    chosen = [part for part in chosen if len(part)]
    if not chosen:
        raise UserError("no training example is left after the eval split and mixing; add data or lower the weights' spread")
    return chosen[0] if len(chosen) == 1 else concatenate_datasets(chosen)
