"""The base model's fingerprint: which model a run trained on, cheap to compute on 140 GB.

A fingerprint reads `CONFIG/wVERSION-WEIGHTS`:
- CONFIG, 16 hex digits: SHA-256 of config.json with the fields that name its location left out;
- WEIGHTS, 32 hex digits: SHA-256 over every weight file in the folder (name and size) and a sample
  of its bytes. For safetensors the sample is the JSON header (every tensor's name, dtype, shape and
  offsets) and `TENSOR_SAMPLE_BYTES` at the start and in the middle of every tensor; for any other
  weight file (GGUF, .bin) the first `HEAD_BYTES`. Every file also gives `FILE_SAMPLES` chunks of
  `SAMPLE_BYTES` at evenly spaced offsets. A 70B checkpoint costs about 1,500 small reads (a few MB),
  never a whole file.

Two models that differ in any tensor's name, shape or dtype, or in weights anywhere a sample falls
(a fine-tune changes every tensor, so every sample), get different fingerprints; a model moved or
downloaded again gets the same one (modification times are not part of it).

Runs written before the weights were covered recorded the 16-digit CONFIG alone; `compare` tells
that case apart so callers can say what could not be checked. Only the standard library and the
I/O layer's header reader are used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import BinaryIO, Literal, Optional

from qlora_kit.io.safetensors import Header, HeaderError, read_header

VERSION = "w1"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
FILE_SAMPLES = 16
SAMPLE_BYTES = 4096
TENSOR_SAMPLE_BYTES = 256
HEAD_BYTES = 1 << 16

Comparison = Literal["same", "config differs", "weights differ", "weights unchecked"]


def config_fingerprint(model_dir: Path) -> str:
    """SHA-256 (16 hex digits) of the model's config.json, with the fields that name its location left out."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 (32 hex digits) of the weight files' names, sizes and sampled bytes (see the module docstring)."""
    digest = hashlib.sha256(VERSION.encode())
    for file in weight_files(model_dir):
        size = file.stat().st_size
        digest.update(f"\0{file.name}\0{size}\0".encode())
        header = _safetensors_header(file) if file.suffix == ".safetensors" else None
        with open(file, "rb") as handle:
            for chunk in _file_samples(handle, size, header):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def model_fingerprint(model_dir: Path) -> str:
    """The fingerprint of the model in `model_dir`: its config.json and its weights."""
    return f"{config_fingerprint(model_dir)}/{VERSION}-{weights_fingerprint(model_dir)}"


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder, in name order (symbolic links, as in the hub cache, followed)."""
    return sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def compare(recorded: str, current: str) -> Comparison:
    """How a recorded fingerprint relates to a model's current one.

    Returns:
        'same'; 'config differs'; 'weights differ'; or 'weights unchecked' when the record (from an
        older qlora_kit, config.json only) matches the config and says nothing about the weights.
    """
    old_config, _, old_weights = recorded.partition("/")
    new_config, _, new_weights = current.partition("/")
    if old_config != new_config:
        return "config differs"
    if not old_weights:
        return "weights unchecked"
    return "same" if old_weights == new_weights else "weights differ"


def covers_weights(recorded: Optional[str]) -> bool:
    """Whether a recorded fingerprint says anything about the weights."""
    return bool(recorded) and "/" in str(recorded)


def _file_samples(handle: BinaryIO, size: int, header: Optional[Header]):
    """The byte samples of one file: its header and tensors (readable safetensors) or its head, then evenly
    spaced chunks."""
    if header is None:
        yield _read_at(handle, 0, HEAD_BYTES)
    else:
        yield header.raw
        for begin, end in header.spans:
            for offset in (begin, (begin + end) // 2):
                yield _read_at(handle, header.data_start + offset, min(TENSOR_SAMPLE_BYTES, end - offset))
    for index in range(FILE_SAMPLES):
        yield _read_at(handle, (size - SAMPLE_BYTES) * index // (FILE_SAMPLES - 1) if size > SAMPLE_BYTES else 0,
                       SAMPLE_BYTES)


def _safetensors_header(file: Path) -> Optional[Header]:
    """The header of a safetensors file, or None if it is unreadable (the file is then sampled as any other)."""
    try:
        return read_header(file)
    except HeaderError:
        return None


def _read_at(handle: BinaryIO, offset: int, size: int) -> bytes:
    handle.seek(max(offset, 0))
    return handle.read(max(size, 0))
