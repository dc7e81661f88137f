"""Safetensors shards written tensor by tensor, and the index file of a sharded model.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. A merged 70B shard
of 5 GB would then sit in RAM, so this module writes the format itself: every name, shape and
dtype of a shard is known before the first byte, so the header (8-byte length + JSON) is written
first and the tensors are appended one at a time, in header order, without a hole. The split of
tensors into shards and the index file follow huggingface_hub's `split_state_dict_into_shards_factory`
and transformers' `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from qlora_kit.io.safetensors import DTYPE_NAMES, INDEX_NAME, TensorSpec

FILENAME_PATTERN = "model{suffix}.safetensors"


def plan_shards(specs: list[TensorSpec], max_shard_size: Union[int, str]) -> dict[str, list[TensorSpec]]:
    """Split tensors into shard files, in the given order, as huggingface_hub splits a state dict."""
    by_name = {spec.name: spec for spec in specs}
    split = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda spec: spec.nbytes, filename_pattern=FILENAME_PATTERN,
        max_shard_size=max_shard_size,
    )
    return {filename: [by_name[name] for name in names] for filename, names in split.filename_to_tensors.items()}


def write_index(folder: Path, shards: dict[str, list[TensorSpec]]) -> Optional[Path]:
    """Write model.safetensors.index.json for a sharded model (nothing for a single file)."""
    if len(shards) == 1:
        return None
    weight_map = {spec.name: filename for filename, specs in shards.items() for spec in specs}
    total = sum(spec.nbytes for specs in shards.values() for spec in specs)
    path = folder / INDEX_NAME
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return path


class ShardWriter:
    """Writes one safetensors file: the header at once, then each tensor's bytes in header order.

    Use as a context manager; leaving it without having written every tensor raises, so a file
    that looks complete always is. The file is not fsynced here: the kernel writes it back while
    the next shard is computed, and the folder's atomic writer syncs every file at the end
    (`qlora_kit.io.atomic`).
    """

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: Optional[dict[str, str]] = None):
        self.path = path
        self.specs = list(specs)
        self._next = 0
        self._written_in_current = 0
        self._handle: Optional[BinaryIO] = None
        self._header = self._build_header(metadata or {"format": "pt"})

    def _build_header(self, metadata: dict[str, str]) -> bytes:
        entries: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in self.specs:
            entries[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                  "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # align the data to 8 bytes, as safetensors does
        return struct.pack("<Q", len(header)) + header

    def __enter__(self) -> "ShardWriter":
        self._handle = open(self.path, "wb")
        self._handle.write(self._header)
        return self

    @property
    def current(self) -> TensorSpec:
        """The tensor whose bytes come next."""
        return self.specs[self._next]

    def write(self, data: Union[torch.Tensor, bytes, memoryview]) -> None:
        """Append bytes of the current tensor: all of it, or consecutive row chunks of it."""
        if isinstance(data, torch.Tensor):
            spec = self.current
            if data.dtype != spec.dtype:
                raise ValueError(f"{spec.name}: writing {data.dtype} into a {spec.dtype} entry")
            data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
        self._append(len(data))
        self._handle.write(data)

    def copy_range(self, source: BinaryIO, offset: int, length: int, chunk: int = 64 << 20) -> None:
        """Append `length` bytes of an open file from `offset` (an unchanged tensor), in chunks."""
        self._append(length)
        self._handle.flush()
        done = 0
        while done < length:
            step = min(chunk, length - done)
            copied = _copy_file_range(source, self._handle, offset + done, step)
            done += copied
        self._handle.seek(0, os.SEEK_END)

    def _append(self, length: int) -> None:
        spec = self.current
        self._written_in_current += length
        if self._written_in_current > spec.nbytes:
            raise ValueError(f"{spec.name}: more bytes than its shape {spec.shape} holds")
        if self._written_in_current == spec.nbytes:
            self._next += 1
            self._written_in_current = 0

    def __exit__(self, exc_type, exc, tb) -> None:
        handle, self._handle = self._handle, None
        try:
            if exc_type is None:
                if self._next != len(self.specs):
                    raise ValueError(f"{self.path.name}: {self.specs[self._next].name} and later tensors were not written")
        finally:
            handle.close()


def _copy_file_range(source: BinaryIO, target: BinaryIO, offset: int, length: int) -> int:
    """Copy bytes between files in the kernel where it can, else through a buffer."""
    if hasattr(os, "copy_file_range"):
        try:
            copied = os.copy_file_range(source.fileno(), target.fileno(), length, offset)
            if copied > 0:
                return copied
        except OSError:
            pass
    source.seek(offset)
    data = source.read(length)
    target.write(data)
    target.flush()
    return len(data)
