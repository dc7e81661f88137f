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


def compare_with_loader(model_dir, compute_dtype: torch.dtype, double_quant: bool, device: torch.device) -> dict:
    """Load `model_dir` as training does and check every 4-bit layer against `nf4_round_trip` of its checkpoint tensor.

    Returns:
        {"layers": how many were compared, "equal": how many matched bit for bit, "compute_dtype": ...}.
    """
    from safetensors import safe_open

    from qlora_kit.config import ModelArguments
    from qlora_kit.export.layout import describe_base
    from qlora_kit.model.load import load_quantized_model

    layout = describe_base(model_dir, compute_dtype, double_quant)
    args = ModelArguments(model_name_or_path=str(model_dir), bnb_4bit_use_double_quant=double_quant)
    model = load_quantized_model(model_dir, args, compute_dtype, device)
    compared = equal = 0
    for tensor in layout.tensors:
        if not tensor.quantized:
            continue
        weight = model.get_submodule(tensor.module).weight
        loaded = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        with safe_open(str(tensor.stored.file), framework="pt") as handle:
            ours = nf4_round_trip(handle.get_tensor(tensor.name), compute_dtype, double_quant, tensor.transposed, device)
        compared += 1
        equal += int(torch.equal(loaded, ours.T if tensor.transposed else ours))
    return {"layers": compared, "equal": equal, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
