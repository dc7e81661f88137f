"""bitsandbytes' repacked CPU layout for 4-bit weights: the one place qlora_kit deals with it.

bitsandbytes (0.48 and later) builds every `Linear4bit` with `support_avx512bf16_for_cpu` read from the
host CPU. Where the CPU has AVX512-BF16, the layer's first forward on the CPU in eval mode without grad
repacks its weight in place into a CPU-only layout ([N, K/2] uint8, block scales un-nested and rounded
to bf16, `quant_state.state2` deleted) and from then on computes in bf16 through a fused kernel. That
makes results depend on the machine: eval logits differ from training's path (the 4-bit weight
dequantized to the compute dtype, then a matmul in it), and anything that reads the weight's bytes or
its quant_state (the quantized cache, the plan-bytes probe, the merge's NF4 comparison) finds another
layout. bitsandbytes undoes the repack when it saves a state dict or moves the weight to a GPU, but the
undo re-quantizes the block scales from their bf16 copies, so it is lossy.

qlora_kit keeps one layout and one set of numerics on every CPU:
- `keep_canonical_layout(model)` turns the repack off on every 4-bit layer; every loader calls it
  right after building the model, so training, eval, verify and export compute the same way on a CPU
  with AVX512-BF16 as on one without. Said once when it changes anything.
- `canonical_weight(param)` is how code reads a 4-bit weight's packed bytes and quant_state. A weight
  repacked by code outside qlora_kit (a model the user ran before handing it over) is brought back to
  the canonical layout with bitsandbytes' own inverse, said once since that inverse is lossy.
It is off for every use, since its bf16 numerics are not those of training (docs/benchmarks.md
says how to time the repacked path on a CPU that has AVX512-BF16).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState

from qlora_kit.log import notice_once

REPACK_FLAG = "support_avx512bf16_for_cpu"  # Linear4bit's attribute, set from the CPU in __init__
PACKED_MARK = "packing_format_for_cpu"  # QuantState's attribute, True once repacked


def four_bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    """Every bitsandbytes 4-bit layer in `model`."""
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def keep_canonical_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn bitsandbytes' AVX512-BF16 CPU repack off on every 4-bit layer of `model`, and undo any done."""
    switched = 0
    for layer in four_bit_layers(model):
        if getattr(layer, REPACK_FLAG, False):
            setattr(layer, REPACK_FLAG, False)
            switched += 1
        if is_repacked(layer.weight):
            canonical_weight(layer.weight)
    if switched:
        notice_once("this CPU has AVX512-BF16: bitsandbytes' repacked bf16 eval path is turned off, so eval "
                    "computes as training does and the 4-bit weights keep one layout on every machine")
    return model


def is_repacked(param: torch.Tensor) -> bool:
    """Whether a 4-bit weight is in bitsandbytes' CPU-only repacked layout."""
    state = getattr(param, "quant_state", None)
    return bool(getattr(state, PACKED_MARK, False))


def canonical_weight(param: bnb.nn.Params4bit) -> tuple[torch.Tensor, QuantState]:
    """The weight's packed NF4 bytes [(N*K+1)//2, 1] and its quant_state, in the canonical layout.

    A repacked weight is converted back in place (the layer keeps working: bitsandbytes computes from
    either layout), so later readers see the canonical one too.
    """
    if is_repacked(param):
        notice_once("a 4-bit weight was in bitsandbytes' repacked CPU layout (the model ran in eval mode on a "
                    "CPU with AVX512-BF16 before qlora_kit got it): converted back; its block scales went "
                    "through bf16 on the way")
        param.data, param.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
            param.data, param.quant_state)
        module = getattr(param, "module", None)
        if module is not None:
            module.quant_state = param.quant_state
    return param.data, param.quant_state
