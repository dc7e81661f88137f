"""A random-weight NF4 model built straight from a config, one projection at a time.

Benchmarks, memory measurements and GPU checks need models of real shapes (8B, 70B) whose weights
cannot travel. The whole model is never materialised in bf16: it is built on the meta device with
its projections already bitsandbytes `Linear4bit`, exactly as the streaming loader builds it (so the
layers `from_pretrained` would quantize are quantized), and each projection gets a random weight
that is quantized on `device` before the next one is drawn. What comes out is the same kind of
model `load_quantized_model` returns, with random values.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from qlora_kit.config import ModelArguments
from qlora_kit.model.stream_load import build_empty_model


def _quantized_random_weight(layer: bnb.nn.Linear4bit, std: float, device: torch.device, dtype: torch.dtype):
    weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device).normal_(0, std)
    return bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                             compress_statistics=layer.weight.compress_statistics).to(device)


def random_quantized_model(
    config: PretrainedConfig,
    compute_dtype: torch.dtype,
    device: torch.device,
    double_quant: bool = True,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A causal LM of `config`'s shape with random NF4 projections, frozen, on `device`, in eval mode."""
    torch.manual_seed(seed)
    config.use_cache = False
    args = ModelArguments(bnb_4bit_use_double_quant=double_quant, attn_implementation=attn_implementation)
    model = build_empty_model(config, args, compute_dtype)
    std = getattr(config, "initializer_range", 0.02)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = _quantized_random_weight(module, std, device, compute_dtype)
            module.compute_dtype = compute_dtype
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=compute_dtype, device=device))
    _materialise_rest(model, device, std)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _materialise_rest(model: nn.Module, device: torch.device, std: float) -> None:
    """Give the unquantized parameters (embeddings, norms, lm_head) storage; move the buffers to `device`."""
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.device.type != "meta":
                continue
            data = torch.empty_like(parameter, device=device)
            if isinstance(module, (nn.Embedding, nn.Linear)):
                data.normal_(0, std)
            else:  # norm weights and the like
                data.fill_(1.0)
            setattr(module, name, nn.Parameter(data, requires_grad=False))
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
