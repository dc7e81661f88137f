"""The shape of a model from its config.json alone: every tensor the frozen base holds, without weights.

The model is built on PyTorch's meta device by transformers' own modeling code (no memory, no
weights), so the inventory is exact for any decoder transformers knows: the projections and their
biases, the norms (two per block for Llama, four for Gemma-2, plus q/k norms for Qwen3), tied or
separate embeddings. Which Linear modules bitsandbytes quantizes is transformers' 4-bit loading's
choice (model/quantized.py): every Linear except the output embeddings (lm_head, or what is tied to
the input embeddings); everything else stays in the compute dtype.

Where the config comes from (`load_model_config`): a shipped shape name (recipes/models/NAME.json),
a config.json file, a model folder, the built-in demo, or a hub id (only its config.json is fetched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from qlora_kit.errors import UserError
from qlora_kit.model.quantized import quantized_linears
from qlora_kit.model.targets import Projections, find_projections

SHIPPED_SHAPES = Path(__file__).resolve().parents[2] / "recipes" / "models"


@dataclass(frozen=True)
class LinearShape:
    """One Linear module: its full name, features, bias, and decoder block (None outside the blocks)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: Optional[int]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ParamShape:
    """One unquantized parameter (embedding, lm_head, norm weight, bias)."""

    name: str
    numel: int
    layer: Optional[int]


@dataclass
class ModelShape:
    """What the planner needs of a model: its dimensions and every tensor of the frozen base."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    final_logit_softcapping: Optional[float]
    projections: Projections
    quantized: list[LinearShape] = field(default_factory=list)
    unquantized: list[ParamShape] = field(default_factory=list)
    norm_dims: list[int] = field(default_factory=list)  # the norm weights of one block, by size
    mlp_gated: bool = True
    fused_qkv: bool = False
    supports_sdpa: bool = True

    @property
    def total_params(self) -> int:
        return sum(q.numel for q in self.quantized) + sum(p.numel for p in self.unquantized)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self, layer: int = 0) -> list[LinearShape]:
        """The quantized Linear modules of one decoder block."""
        return [q for q in self.quantized if q.layer == layer]


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_model_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config from a shipped shape name, a config.json, a folder, the demo, or a hub id."""
    from qlora_kit.sources import DEMO_MODEL, resolve_model

    shipped = SHIPPED_SHAPES / f"{model}.json"
    path = Path(model).expanduser()
    if shipped.is_file():
        path = shipped
    elif model == DEMO_MODEL:
        path = resolve_model(model) / "config.json"
    elif path.is_dir():
        path = path / "config.json"
    elif not path.exists() and len(model.split("/")) == 2:
        path = _hub_config(model)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SHIPPED_SHAPES.glob("*.json")))
        raise UserError(f"no model config at {model}; give a config.json, a model folder, a hub id or one of: {names}")
    try:
        values = json.loads(path.read_text())
        return AutoConfig.for_model(**values) if "model_type" in values and "auto_map" not in values else \
            AutoConfig.from_pretrained(path.parent, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a model config transformers can read: {' '.join(str(error).split())[:200]}") from None


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as error:  # offline, unknown or gated repo: fixable by the user
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"could not fetch config.json of {repo_id} from the hub ({reason}); pass a local config.json") from None


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM built on the meta device: its modules and shapes, no memory."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as error:
        raise UserError(f"transformers cannot build a causal LM from this config: {' '.join(str(error).split())[:200]}") from None


def _layer_index(name: str, blocks_path: str) -> Optional[int]:
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".")[0])


def shape_from_model(model: nn.Module, config: PretrainedConfig) -> ModelShape:
    """Inventory the frozen base of a (meta or real, unquantized) model built from `config`."""
    text = _text_config(config)
    projections = find_projections(model)
    if any(word in name for name in projections.mlp for word in ("experts", "moe")):
        raise UserError("the memory planner knows dense decoders only; this model has mixture-of-experts layers")
    quantized, quantized_params = [], set()
    for name, module in quantized_linears(model):
        features = (module.weight.shape if type(module) is not nn.Linear  # Conv1D: stored [in, out]
                    else (module.in_features, module.out_features))
        layer = _layer_index(name, projections.blocks_path)
        quantized.append(LinearShape(name, *features, module.bias is not None, layer))
        quantized_params.add(f"{name}.weight")
    unquantized = [ParamShape(name, p.numel(), _layer_index(name, projections.blocks_path))
                   for name, p in model.named_parameters() if name not in quantized_params]
    block = model.get_submodule(projections.blocks_path)[0]
    norm_dims = [m.weight.numel() for n, m in block.named_modules()
                 if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None]
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    return ModelShape(
        model_type=text.model_type,
        hidden_size=text.hidden_size,
        intermediate_size=_mlp_width(model, projections),
        num_layers=projections.num_blocks,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        tied_embeddings=model.get_output_embeddings() is not None and model.get_input_embeddings() is not None
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
        projections=projections,
        quantized=quantized,
        unquantized=unquantized,
        norm_dims=norm_dims,
        mlp_gated=_mlp_gated(model, projections),
        fused_qkv=any(block.get_submodule(n).out_features == q_dim + 2 * kv_dim for n in projections.attention),
        supports_sdpa=bool(getattr(model, "_supports_sdpa", True)),
    )


def _mlp_linears(model: nn.Module, projections: Projections) -> list[nn.Linear]:
    block = model.get_submodule(projections.blocks_path)[0]
    return [block.get_submodule(name) for name in projections.mlp]


def _mlp_width(model: nn.Module, projections: Projections) -> int:
    """The MLP's inner width: the input features of its last projection (down_proj)."""
    linears = _mlp_linears(model, projections)
    return linears[-1].in_features if linears else 0


def _mlp_gated(model: nn.Module, projections: Projections) -> bool:
    """Gated MLPs (SwiGLU, GeGLU) widen to twice the inner width before the product."""
    linears = _mlp_linears(model, projections)
    if len(linears) < 2:
        return False
    return sum(m.out_features for m in linears[:-1]) == 2 * linears[-1].in_features


def model_shape(model: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model named as `load_model_config` takes it, from its config alone."""
    config = load_model_config(model, trust_remote_code)
    return shape_from_model(meta_model(config, trust_remote_code), config)
