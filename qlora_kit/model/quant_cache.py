"""The quantized-model cache (`--quantized_cache DIR`): quantize a checkpoint once, load NF4 after.

A 70B checkpoint is 140 GB of bf16 to read and quantize; its NF4 form is about 35 GB. The cache
holds the placed model's tensors in safetensors, the NF4 weights in the layout transformers uses
for bitsandbytes checkpoints (`X.weight` packed, plus `X.weight.absmax`, `.quant_map`,
`.nested_absmax`, `.nested_quant_map` and `.quant_state.bitsandbytes__nf4`), one file per decoder
layer and files of at most 1 GiB for the rest, and manifest.json: the source files it was made
from (name, size, modification time), the quantization settings, and the files it holds. A cache
whose source or settings differ from this run's is refused. It is written to DIR.partial and
renamed to DIR when complete (`qlora_kit.io.atomic`), so a run that stops half way leaves no half
cache behind.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file

from qlora_kit.config import ModelArguments
from qlora_kit.errors import UserError
from qlora_kit.io.atomic import atomic_folder
from qlora_kit.io.safetensors import read_tensors
from qlora_kit.model.bnb_cpu import canonical_weight

FORMAT = "qlora_kit-nf4-cache"
VERSION = 1
MANIFEST = "manifest.json"
MAX_FILE_BYTES = 1 << 30
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def source_fingerprint(model_dir: Path) -> dict[str, dict[str, int]]:
    """Size and modification time of every weight and JSON file of the source model."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files}


def cache_settings(args: ModelArguments, compute_dtype: torch.dtype) -> dict:
    return {
        "quant_type": "nf4",
        "double_quant": args.bnb_4bit_use_double_quant,
        "blocksize": 64,
        "quant_storage": "uint8",
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
    }


def _differences(recorded: dict, expected: dict) -> list[str]:
    """What differs between a cache's manifest and this run, in words."""
    found = []
    for key, value in expected["settings"].items():
        if recorded.get("settings", {}).get(key) != value:
            found.append(f"{key} {recorded.get('settings', {}).get(key)} (now {value})")
    old, new = recorded.get("source", {}), expected["source"]
    changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    if changed:
        found.append("source file(s) " + ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else ""))
    return found


class QuantizedCache:
    """One cache folder, checked against the source model folder and this run's settings."""

    def __init__(self, folder: Path, model_dir: Path, args: ModelArguments, compute_dtype: torch.dtype):
        self.folder = folder
        self.model_dir = model_dir
        self.expected = {"format": FORMAT, "version": VERSION, "source": source_fingerprint(model_dir),
                         "settings": cache_settings(args, compute_dtype)}

    def ready(self) -> bool:
        """True when the folder holds a cache of this source and settings; refuses a different one."""
        if not self.folder.exists():
            return False
        if not self.folder.is_dir():
            raise UserError(f"--quantized_cache {self.folder} is a file; name a folder")
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            if any(self.folder.iterdir()):
                raise UserError(f"--quantized_cache {self.folder} is a non-empty folder without {MANIFEST}; "
                                f"name a new or empty folder")
            return False
        recorded = json.loads(manifest.read_text())
        if recorded.get("format") != FORMAT or recorded.get("version") != VERSION:
            raise UserError(f"--quantized_cache {self.folder} is not a qlora_kit cache of version {VERSION}; "
                            f"delete it or name another folder")
        differences = _differences(recorded, self.expected)
        if differences:
            raise UserError(f"--quantized_cache {self.folder} was made from a different model or settings "
                            f"({'; '.join(differences)}); delete it or name another folder")
        self.files = recorded["files"]
        return True

    def load_into(self, placer) -> None:
        """Place every cached tensor through `placer` (a stream_load.TensorPlacer)."""
        for file in self.files:
            tensors = dict(read_tensors(self.folder / file))  # one layer, or at most 1 GiB
            states = {key for key in tensors if key.endswith(tuple("." + s for s in STATE_SUFFIXES))}
            for key in [k for k in tensors if k not in states]:
                stats = {k[len(key) + 1:]: tensors.pop(k) for k in sorted(states) if k.startswith(key + ".")}
                if stats:
                    placer.put_quantized(key, tensors.pop(key), stats)
                else:
                    placer.put(key, tensors.pop(key))

    @contextmanager
    def writer(self) -> Iterator["CacheWriter"]:
        """A writer into FOLDER.partial, renamed to FOLDER (empty or absent: checked by ready()) once
        everything is written."""
        with atomic_folder(self.folder, self.folder.with_name(self.folder.name + ".partial")) as partial:
            writer = CacheWriter(partial)
            yield writer
            writer.flush()
            manifest = {**self.expected, "files": writer.files}
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))


class CacheWriter:
    """Collects placed tensors on the host and writes them, one decoder layer per file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[str] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.group: Optional[int] = None

    def add(self, name: str, model: torch.nn.Module, layer: Optional[int]) -> None:
        """Queue the placed tensor `name` of `model` (with its quantization state)."""
        if layer != self.group or self.pending_bytes >= MAX_FILE_BYTES:
            self.flush()
            self.group = layer
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = getattr(module, attr)
        if not isinstance(tensor, bnb.nn.Params4bit):
            self._queue(name, tensor)
            return
        packed, state = canonical_weight(tensor)
        self._queue(name, packed)
        for key, value in state.as_dict(packed=True).items():
            self._queue(f"{name}.{key}", value)

    def _queue(self, key: str, tensor: torch.Tensor) -> None:
        host = tensor.detach().to("cpu").as_subclass(torch.Tensor)
        if host.numel() < (1 << 20) or not host.is_contiguous():
            host = host.contiguous().clone()  # small states may share storage, which safetensors refuses
        self.pending[key] = host
        self.pending_bytes += host.numel() * host.element_size()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0
