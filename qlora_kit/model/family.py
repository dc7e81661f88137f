"""Per model family, the facts the code needs about transformers' models, written down once.

This module is the one place that knows transformers' model internals. For each supported family
(keyed by config.json's `model_type`) a `Family` says where the decoder layers, the final norm and
the embeddings are, which projections a decoder block has (fused ones included: Phi-3's `qkv_proj`
and `gate_up_proj`), what the causal-LM forward does to the logits after `lm_head` (Gemma's final
softcapping, Cohere's `logit_scale`, Granite's `logits_scaling`), and conventions that code reading
the weights directly would need: Gemma's embedding scale (sqrt(hidden)), its `(1 + w)` norms, and
sliding-window layers (tests/test_families.py checks each against the model). A model of another
family still trains: its projections are found by name (qlora_kit/model/targets.py) and its loss is
the model's own (qlora_kit/train/loss.py).

It also owns the two explicit wrappers through which qlora_kit changes how transformers runs a
decoder layer, each checked to exist rather than assumed: the layer's checkpoint function
(`set_checkpoint_function`, used by activation offload) and a temporary replacement of a layer's
`forward` on the instance (`replaced_forwards`, used by layer-major accumulation).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from torch import nn

from qlora_kit.log import notice_once

LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    """What qlora_kit knows of one family of causal LMs; module paths are relative to the causal LM."""

    name: str
    attention: tuple[str, ...] = LLAMA_ATTENTION  # projections, relative to a decoder block
    mlp: tuple[str, ...] = LLAMA_MLP
    fused: tuple[str, ...] = ()                   # projections that hold several (q,k,v or gate,up)
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    embeddings: str = "model.embed_tokens"
    softcap_field: Optional[str] = None   # config field: logits = cap * tanh(logits / cap)
    scale_field: Optional[str] = None     # config field: logits = logits * scale
    divisor_field: Optional[str] = None   # config field: logits = logits / divisor
    embedding_scale: bool = False         # embeddings are multiplied by sqrt(hidden_size)
    norm_plus_one: bool = False           # RMSNorm computes x_hat * (1 + w), so w = 0 is the identity
    attention_kernels: Optional[tuple[str, ...]] = None  # the attn_implementations it has; None: any

    @property
    def projections(self) -> tuple[str, ...]:
        return self.attention + self.mlp

    def logit_steps(self, config) -> dict[str, float]:
        """What follows lm_head for a model of this config: {'multiply'|'divide'|'softcap': value}."""
        steps = {}
        for step, field in (("multiply", self.scale_field), ("divide", self.divisor_field),
                            ("softcap", self.softcap_field)):
            value = getattr(config, field, None) if field else None
            if value is not None:
                steps[step] = float(value)
        return steps


_GEMMA = dict(softcap_field="final_logit_softcapping", embedding_scale=True, norm_plus_one=True)

# model_type -> Family. SmolLM and many fine-tunes are Llamas; Gemma-3 here is its text model.
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral"),
    "qwen2": Family("Qwen2"),
    "qwen3": Family("Qwen3"),
    "gemma2": Family("Gemma-2", attention_kernels=("eager", "flash_attention_2"), **_GEMMA),  # attention softcapping
    "gemma3_text": Family("Gemma-3", **_GEMMA),
    "phi3": Family("Phi-3", attention=("self_attn.qkv_proj", "self_attn.o_proj"),
                   mlp=("mlp.gate_up_proj", "mlp.down_proj"), fused=("self_attn.qkv_proj", "mlp.gate_up_proj")),
    "granite": Family("Granite", divisor_field="logits_scaling"),
    "cohere": Family("Cohere", scale_field="logit_scale"),
}


def family_for(model_type: Optional[str]) -> Optional[Family]:
    """The family of a config.json `model_type`, or None for one qlora_kit has no facts about."""
    return FAMILIES.get(model_type or "")


def family_of(model: nn.Module) -> Optional[Family]:
    """The family of a transformers model (under a peft wrapper or not), or None."""
    config = getattr(model, "config", None)
    return family_for(getattr(config, "model_type", None))


def attention_for(source, requested: str) -> str:
    """The attention implementation to load a model with (`source`: its config, or its folder): the
    requested one if its family has it, else the family's first (said once), so that the default
    never stops a supported family.
    """
    model_type = getattr(source, "model_type", None)
    if model_type is None:
        try:
            model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, TypeError):
            return requested  # the loader reports an unreadable folder
    family = family_for(model_type)
    if family is None or family.attention_kernels is None or requested in family.attention_kernels:
        return requested
    chosen = family.attention_kernels[0]
    notice_once(f"{family.name} has no {requested} attention in transformers: using {chosen}")
    return chosen


def supported_names() -> str:
    return ", ".join(f"{family.name} ({model_type})" for model_type, family in FAMILIES.items())


def check_structure(model: nn.Module, family: Family) -> None:
    """Check that a causal LM has every module its family's facts name.

    Raises:
        RuntimeError: a module is missing: the installed transformers changed this family's layout,
            and nothing that relies on the facts may run on it.
    """
    def require(path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise RuntimeError(f"{family.name}: {type(model).__name__} has no module {path}; this transformers "
                               f"version changed the family's layout, which qlora_kit/model/family.py describes")
    layers = require(family.layers)
    for path in (family.final_norm, family.embeddings):
        require(path)
    for index in range(len(layers)):
        for projection in family.projections:
            require(f"{family.layers}.{index}.{projection}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.out_features != model.config.vocab_size:
        raise RuntimeError(f"{family.name}: {type(model).__name__}'s output embeddings are not a Linear layer onto "
                           f"the vocabulary; this transformers version changed the family's logit head")


def sliding_window_layers(config) -> list[int]:
    """Indices of the layers that attend within a sliding window (config.layer_types), if any."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None) or []
    return [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]


# ---- the explicit wrappers around transformers' decoder layers -------------------------------------

_CHECKPOINT_ATTRIBUTE = "_gradient_checkpointing_func"  # transformers' GradientCheckpointingLayer


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that run under gradient checkpointing (transformers' `gradient_checkpointing` flag)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]


def set_checkpoint_function(layer: nn.Module, function: Callable) -> Callable:
    """Make a checkpointed decoder layer call `function(run, *args)` in place of torch's checkpoint.

    transformers' GradientCheckpointingLayer calls the function it holds with a partial of its own
    forward and the positional arguments; that attribute is private, so it is checked to exist.

    Returns:
        The function the layer held before, to give back with another call.
    """
    previous = getattr(layer, _CHECKPOINT_ATTRIBUTE, None)
    if previous is None:
        raise RuntimeError(f"{type(layer).__name__} has gradient checkpointing on but no {_CHECKPOINT_ATTRIBUTE}; "
                           f"this transformers version checkpoints layers another way, which activation offload "
                           f"does not know: set --offload_activations false")
    setattr(layer, _CHECKPOINT_ATTRIBUTE, function)
    return previous


@contextmanager
def replaced_forwards(layers: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Within the block, decoder layer i runs `make(i)` in place of its forward (set on the instance).

    The model's own forward still calls each layer through nn.Module.__call__, so hooks (the layer
    streamer's) keep running. On exit the instance attribute is removed and the class's forward is back.
    """
    taken = [index for index, layer in enumerate(layers) if "forward" in vars(layer)]
    if taken:
        raise RuntimeError(f"decoder layer {taken[0]} already has its forward replaced")
    for index, layer in enumerate(layers):
        layer.forward = make(index)
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)

