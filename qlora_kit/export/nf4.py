"""The NF4 round trip training saw: quantize a projection exactly as loading did, then dequantize it.

When qlora_kit loads the base (transformers' bitsandbytes integration, `Bnb4bitQuantize`), each
projection weight is first cast to the model's dtype, which is the compute dtype; a GPT-2 style
Conv1D weight, stored [in, out], is transposed to [out, in]; then bitsandbytes' `Params4bit` moves
it to the device, which calls `quantize_4bit` on the contiguous tensor with blocksize 64 (its
default), quant_type nf4, compress_statistics = double quantization and quant_storage uint8. The
same call on the same kind of device gives the same bytes, and `dequantize_4bit` of them gives, bit
for bit, the weights the 4-bit layers computed with during training.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import torch

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers does not override


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool, conv1d: bool,
                   device: torch.device) -> torch.Tensor:
    """dequant(quant(W)) in `compute_dtype` on `device`, returned in the checkpoint's own layout.

    Args:
        weight: the checkpoint tensor (any float dtype); the caller should hold no other reference,
            so its memory is freed as soon as it is cast.
        compute_dtype: the dtype the run loaded the base in.
        double_quant: whether the block scales were quantized too.
        conv1d: the tensor is a GPT-2 Conv1D weight, stored [in, out].
        device: where to quantize (cuda when training ran on a GPU).
    """
    oriented = weight.to(device=device, dtype=compute_dtype)
    del weight
    if conv1d:
        oriented = oriented.T
    oriented = oriented.contiguous()
    packed, state = bnb_functional.quantize_4bit(
        oriented, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8
    )
    del oriented
    restored = bnb_functional.dequantize_4bit(packed, state)
    return restored.T if conv1d else restored
