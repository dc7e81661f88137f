"""A saved PEFT LoRA adapter, read module by module, and its update to one base weight.

The formulas are peft's own (peft/tuners/lora/layer.py, variants.py, dora.py), computed in fp32:
- LoRA: W + s * B @ A, with s = alpha / r, or alpha / sqrt(r) with rsLoRA (alpha_pattern per module);
- DoRA: m / ||W + s * B @ A||_row * (W + s * B @ A), the norm taken over each output row;
- embeddings: W + s * (B @ A)^T, since peft stores an embedding's A as [r, vocab].
A GPT-2 style Conv1D weight is stored [in, out], the transpose of B @ A; `transposed` marks it.
peft itself is not imported: its import costs seconds and the merge needs none of its code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from qlora_kit.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY_PATTERN = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<linear>lora_[AB])\.weight|lora_embedding_(?P<embedding>[AB])|"
    r"(?P<magnitude>lora_magnitude_vector)|base_layer\.(?P<base>weight))$"
)


@dataclass
class LoraUpdate:
    """One module's adapter: W -> W + scale * B @ A (then the DoRA rescale when `magnitude` is set)."""

    module: str
    a: torch.Tensor  # [r, in]; for an embedding [r, vocab]
    b: torch.Tensor  # [out, r]; for an embedding [dim, r]
    scale: float
    magnitude: Optional[torch.Tensor] = None  # DoRA: [out]
    embedding: bool = False

    def to(self, device: torch.device) -> "LoraUpdate":
        """The factors on `device` in fp32, where the merge computes."""
        magnitude = None if self.magnitude is None else self.magnitude.to(device, torch.float32)
        return LoraUpdate(self.module, self.a.to(device, torch.float32), self.b.to(device, torch.float32),
                          self.scale, magnitude, self.embedding)

    def delta_rows(self, start: int, stop: int, transposed: bool) -> torch.Tensor:
        """Rows [start, stop) of scale * B @ A in the stored layout ([out, in], or [in, out] if transposed)."""
        if transposed or self.embedding:
            return (self.a[:, start:stop].T @ self.b.T).mul_(self.scale)
        return (self.b[start:stop] @ self.a).mul_(self.scale)



class LoraAdapter:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), read lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not folder.is_dir():
            raise UserError(f"--adapter_dir {folder} does not exist; point it at a run folder")
        if not config_file.is_file() or not weights_file.is_file():
            raise UserError(f"{folder} holds no PEFT adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
                            f"point --adapter_dir at a run folder")
        self.config = json.loads(config_file.read_text())
        self._check_config()
        self._weights_file = weights_file
        self.keys: dict[str, dict[str, str]] = {}
        with safe_open(str(weights_file), framework="pt") as handle:
            self._index_keys(list(handle.keys()))

    def _check_config(self) -> None:
        peft_type = self.config.get("peft_type")
        if peft_type != "LORA":
            raise UserError(f"{self.folder}/{ADAPTER_CONFIG} is a {peft_type} adapter; export merges LoRA adapters only")
        if self.config.get("lora_bias") or self.config.get("bias", "none") != "none":
            raise UserError(f"{self.folder} trains biases (bias/lora_bias set); export merges LoRA weights only")

    def _index_keys(self, keys: list[str]) -> None:
        unknown = []
        for key in keys:
            match = KEY_PATTERN.match(key.removeprefix(PREFIX))
            if not key.startswith(PREFIX) or match is None:
                unknown.append(key)
                continue
            kinds = self.keys.setdefault(match.group("module"), {})
            if match.group("linear"):
                kinds[match.group("linear")] = key
            elif match.group("embedding"):
                kinds[f"lora_{match.group('embedding')}"] = key
                kinds["embedding"] = key
            elif match.group("magnitude"):
                kinds["magnitude"] = key
            else:
                kinds["base_weight"] = key
        if unknown:
            listed = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            raise UserError(f"{self.folder}/{ADAPTER_WEIGHTS} holds tensors export cannot merge ({listed}); "
                            f"only LoRA and DoRA weights on linear and embedding layers are merged")
        for module, kinds in self.keys.items():
            if "lora_A" not in kinds and "base_weight" not in kinds:
                raise UserError(f"{self.folder}/{ADAPTER_WEIGHTS}: module {module} has no lora_A weight")

    @property
    def lora_modules(self) -> list[str]:
        """Module names (as in the model) that carry a LoRA update."""
        return [module for module, kinds in self.keys.items() if "lora_A" in kinds]

    def has_base_weight(self, module: Optional[str]) -> bool:
        """Whether the adapter saved a full base weight for `module` (peft saves the embeddings it adapted)."""
        return module is not None and "base_weight" in self.keys.get(module, {})

    def _read(self, *keys: str) -> list[torch.Tensor]:
        """Tensors of the adapter file, through a handle of their own (see merge.TensorSource for why)."""
        with safe_open(str(self._weights_file), framework="pt") as handle:
            return [handle.get_tensor(key) for key in keys]

    def base_weight(self, module: str) -> torch.Tensor:
        """The full base weight the adapter saved for `module`."""
        return self._read(self.keys[module]["base_weight"])[0]

    def scale(self, module: str, rank: int) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA, with alpha from alpha_pattern where it names the module."""
        alpha = self.config.get("lora_alpha", 8)
        pattern = self.config.get("alpha_pattern") or {}
        for key, value in pattern.items():  # peft's get_pattern_key: the first key matching the name's end
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def check_fits(self, module: str, base_shape: tuple[int, ...], transposed: bool) -> None:
        """Refuse, before anything is written, an update that does not fit the base tensor it changes.

        Only the safetensors header is read.
        """
        kinds = self.keys[module]
        with safe_open(str(self._weights_file), framework="pt") as handle:
            shapes = {kind: tuple(handle.get_slice(kinds[kind]).get_shape())
                      for kind in ("lora_A", "lora_B", "magnitude", "base_weight") if kind in kinds}
        a, b = shapes["lora_A"], shapes["lora_B"]
        if "embedding" in kinds and "magnitude" in kinds:
            raise UserError(f"{module}: export does not merge DoRA on embedding layers")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise UserError(f"{module}: LoRA factors of shapes {a} and {b} do not fit together; "
                            f"export merges linear and embedding layers only")
        delta = (a[1], b[0]) if transposed or "embedding" in kinds else (b[0], a[1])
        if delta != tuple(base_shape) or shapes.get("base_weight", delta) != delta:
            raise UserError(f"{module}: the adapter's update of shape {delta} does not fit the base weight "
                            f"{tuple(base_shape)}; is the base model the one it was trained on?")

    def update(self, module: str) -> LoraUpdate:
        """Read one module's factors (checked by `check_fits`)."""
        kinds = self.keys[module]
        a, b, *rest = self._read(kinds["lora_A"], kinds["lora_B"], *([kinds["magnitude"]] if "magnitude" in kinds else []))
        return LoraUpdate(module, a, b, self.scale(module, a.shape[0]), rest[0] if rest else None, "embedding" in kinds)
