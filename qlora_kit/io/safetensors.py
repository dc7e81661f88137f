"""Reading safetensors checkpoints: the header, the tensors, a model folder's shard files, key names.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
JSON header (every tensor's dtype, shape and [begin, end) byte offsets into the data section, and
an optional `__metadata__`), then the data. safetensors' own `safe_open` neither gives the byte
offsets and the raw header bytes (which the export copies by and the fingerprint hashes) nor
reads without a memory map (see `read_tensors`), so the header is parsed here, in one place.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Iterator, Optional

import torch

from qlora_kit.errors import UserError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its header

# safetensors' dtype names (the format spec) and the torch dtypes they hold.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class HeaderError(ValueError):
    """A file whose safetensors header cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Header:
    """The parsed header of one safetensors file."""

    raw: bytes  # the JSON header as stored (padding included)
    entries: dict[str, dict]  # tensor name -> {"dtype", "shape", "data_offsets"}, without __metadata__
    spans: list[tuple[int, int]]  # every tensor's [begin, end) in the data section, by begin

    @property
    def data_start(self) -> int:
        """The absolute offset of the data section."""
        return 8 + len(self.raw)

    @property
    def file_size(self) -> int:
        """The size the file has when its data section ends where the last tensor ends."""
        return self.data_start + max((end for _, end in self.spans), default=0)


def read_header(path: Path) -> Header:
    """Read and check the header of a safetensors file; no tensor data is read.

    Raises:
        HeaderError: the length prefix is missing, zero, over `MAX_HEADER_BYTES` or past the end of
            the file ("PATH is truncated or not a safetensors file (N bytes)"), or the JSON or an
            entry's offsets do not parse ("PATH has a damaged header").
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise HeaderError(f"{path} is truncated or not a safetensors file ({size:,} bytes)")
        raw = handle.read(length)
    try:
        entries = json.loads(raw)
        entries.pop("__metadata__", None)
        spans = sorted(_span(entry["data_offsets"]) for entry in entries.values())
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise HeaderError(f"{path} has a damaged header") from None
    return Header(raw, entries, spans)


def _span(offsets: list) -> tuple[int, int]:
    begin, end = offsets
    return int(begin), int(end)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and dtype: enough to place it in a shard before it exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class StoredTensor:
    """A tensor inside an existing safetensors file: its spec and where its bytes are."""

    spec: TensorSpec
    file: Path
    offset: int  # absolute byte offset of the data in the file


def read_layout(file: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file, in the order of their bytes (only the header is read).

    Raises:
        ValueError: a tensor's dtype has no torch dtype here (or the header is unreadable).
    """
    header = read_header(file)
    tensors = []
    for name, entry in header.entries.items():
        if entry["dtype"] not in DTYPES_BY_NAME:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}, which export does not handle")
        spec = TensorSpec(name, tuple(entry["shape"]), DTYPES_BY_NAME[entry["dtype"]])
        tensors.append(StoredTensor(spec, file, header.data_start + entry["data_offsets"][0]))
    return sorted(tensors, key=lambda t: t.offset)


def read_tensors(path: Path, keys: Optional[Collection[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file (only those named in `keys`, when given), in header order, each read
    with a plain file read into its own buffer.

    `safetensors.safe_open` memory-maps the file, and every page it reads stays in the process's
    resident set until the file is closed: the resident set grows by a whole shard (5 GB for a
    typical 70B shard). Reading each tensor's bytes keeps only the tensor being used; the page
    cache for those bytes is dropped too, so reading 140 GB does not evict everything else.

    Raises:
        UserError: a tensor's dtype has no torch dtype here, or the file ends before a tensor does.
    """
    header = read_header(path)
    with open(path, "rb", buffering=0) as file:
        for key, info in header.entries.items():
            if keys is not None and key not in keys:
                continue
            if info["dtype"] not in DTYPES_BY_NAME:
                raise UserError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which the streaming loader "
                                f"does not read")
            begin, end = info["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            file.seek(header.data_start + begin)
            if file.readinto(memoryview(buffer.numpy())) != end - begin:
                raise UserError(f"{path} is truncated (tensor {key}); download it again")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(file.fileno(), header.data_start + begin, end - begin, os.POSIX_FADV_DONTNEED)
            yield key, buffer.view(DTYPES_BY_NAME[info["dtype"]]).reshape(info["shape"])


def read_checkpoint(shards: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the shards, one at a time (only the one being used is in memory)."""
    for shard in shards:
        yield from read_tensors(shard)


def index_shard_names(index: Path) -> list[str]:
    """The shard file names a `*.index.json` names, in its order, each once.

    Raises:
        ValueError, KeyError, TypeError, AttributeError: the index does not parse.
    """
    return list(dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def shard_files(folder: Path, single: str = "*.safetensors") -> list[Path]:
    """A model folder's safetensors files: those its index names, else those matching `single` (may be none)."""
    index = folder / INDEX_NAME
    if index.is_file():
        return [folder / name for name in index_shard_names(index)]
    return sorted(folder.glob(single))


def model_key(key: str, names: set[str], prefix: str) -> Optional[str]:
    """The model's name for a checkpoint key: the same name, or with the base model's prefix added or dropped.

    Args:
        key: a tensor name in the checkpoint.
        names: the model's parameter (and buffer) names.
        prefix: the model's `base_model_prefix` ("model" for most), without the dot; may be empty.
    """
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None
