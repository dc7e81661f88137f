"""Dataset names -> raw `datasets.Dataset` parts, read by `datasets` and held in its cache.

`--dataset_name` takes one source or several, comma-separated, each optionally weighted
(`a.jsonl:0.7,b.parquet:0.3`). A source is:
- a built-in name (`chatterbot-en`),
- a .jsonl / .json / .parquet / .csv file,
- a folder of such files (read in sorted order, one part per file type),
- a folder written by `datasets`' `save_to_disk` (its `train` split, or its only split),
- a hub id (`org/name`, its `train` split) when the hub can be reached.
Each part carries a fingerprint that changes when its data changes, so the tokenized result can
be cached against it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from qlora_kit.data.diagnose import TEXT_SUFFIXES, check_utf8, explain_read_failure
from qlora_kit.data.formats import chatterbot_records
from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.sources import BUILTIN_DATASETS, _looks_like_hub_id

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
KINDS = "a .jsonl/.json/.parquet/.csv file, a folder of them, a save_to_disk folder, a hub id"


@dataclass(frozen=True)
class Source:
    """One entry of --dataset_name: a name and its optional mixing weight."""

    name: str
    weight: Optional[float] = None


@dataclass
class RawPart:
    """Records read from (part of) a source, before any format is applied."""

    dataset: Dataset
    where: str  # names the part in messages: a file, a folder, a hub id, a built-in name
    fingerprint: str  # changes when the data changes


def parse_sources(spec: str, flag: str = "--dataset_name") -> list[Source]:
    """`a.jsonl:0.7,b.parquet:0.3` -> sources with weights; every source has a weight, or none has."""
    sources = []
    for entry in (part.strip() for part in str(spec).split(",")):
        if not entry:
            continue
        name, weight = entry, None
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                name, weight = head, float(tail)
            except ValueError:
                if _meant_as_weight(entry, tail):
                    raise UserError(f"{flag}: the weight of {head} is '{tail}', which is not a number; "
                                    f"write a positive number, e.g. {head}:0.5") from None
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise UserError(f"{flag}: the weight of {name} must be a positive number, got {tail}")
        sources.append(Source(name, weight))
    if not sources:
        raise UserError(f"{flag} is empty; give {KINDS}, or a built-in name ({', '.join(BUILTIN_DATASETS)})")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise UserError(f"{flag}: give every source a weight (a.jsonl:0.7,b.jsonl:0.3) or none")
    return sources


def _meant_as_weight(entry: str, tail: str) -> bool:
    """Whether the text after the last ':' of a source was meant as its weight (not part of a path)."""
    if not tail or Path(entry).expanduser().exists():
        return False
    return not any(c in tail for c in "/\\") and Path(tail).suffix.lower() not in BUILDERS


def _fingerprint(*items: object) -> str:
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()[:32]


def _file_stamp(files: list[Path]) -> list[tuple[str, int, int]]:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def load_source(source: Source, cache_dir: Path) -> list[RawPart]:
    """Read one source into raw parts (a folder of mixed file types gives one part per type)."""
    name = source.name
    if name in BUILTIN_DATASETS:
        files = BUILTIN_DATASETS[name]()
        return [RawPart(Dataset.from_list(chatterbot_records(files)), name, _fingerprint(name, _file_stamp(files)))]
    path = Path(name).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"dataset file {path} has an unsupported type {path.suffix or '(none)'}; give {KINDS}")
        return [_read_files(builder, [path], str(path), cache_dir)]
    if path.is_dir():
        return _read_folder(path, cache_dir)
    if _looks_like_hub_id(name) and Path(name).suffix.lower() not in BUILDERS:
        return [_read_hub(name, cache_dir)]
    raise UserError(f"dataset {name} does not exist; give {KINDS}, or a built-in name ({', '.join(BUILTIN_DATASETS)})")


def _read_files(builder: str, files: list[Path], where: str, cache_dir: Path) -> RawPart:
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            check_utf8(file)
    try:
        dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir))
    except Exception as error:  # datasets' reader errors: turned into one line that names the problem
        raise UserError(explain_read_failure(files, builder, where, error)) from None
    return RawPart(dataset, where, _fingerprint(builder, _file_stamp(files)))


def _read_folder(folder: Path, cache_dir: Path) -> list[RawPart]:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return [_read_saved(folder)]
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                   and not any(p.startswith(".") for p in f.relative_to(folder).parts))
    if not files:
        raise UserError(f"dataset folder {folder} holds no .jsonl/.json/.parquet/.csv file and is not a "
                        "save_to_disk folder")
    by_builder: dict[str, list[Path]] = {}
    for file in files:
        by_builder.setdefault(BUILDERS[file.suffix.lower()], []).append(file)
    return [_read_files(builder, group, f"{folder} ({builder} files)" if len(by_builder) > 1 else str(folder), cache_dir)
            for builder, group in by_builder.items()]


def _train_split(loaded, where: str) -> Dataset:
    if isinstance(loaded, DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            split = next(iter(loaded))
            notice_once(f"{where} has no 'train' split: using its only split, '{split}'")
            return loaded[split]
        raise UserError(f"{where} has no 'train' split (it has {', '.join(loaded)}); save the training split as 'train'")
    return loaded


def _read_saved(folder: Path) -> RawPart:
    try:
        dataset = _train_split(load_from_disk(str(folder)), str(folder))
    except UserError:
        raise
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"could not read the save_to_disk folder {folder}: {reason}") from None
    return RawPart(dataset, str(folder), _fingerprint("saved", str(folder.resolve()), dataset._fingerprint))


def _read_hub(repo_id: str, cache_dir: Path) -> RawPart:
    try:
        dataset = _train_split(load_dataset(repo_id, cache_dir=str(cache_dir)), repo_id)
    except UserError:
        raise
    except Exception as error:  # offline, unknown or gated repo: all fixable by the user
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"dataset {repo_id} is not a local path and could not be loaded from the hub ({reason})") from None
    return RawPart(dataset, repo_id, _fingerprint("hub", repo_id, dataset._fingerprint))
