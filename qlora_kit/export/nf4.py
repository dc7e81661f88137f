"""The NF4 round trip training saw: quantize a projection exactly as loading did, then dequantize it.

When qlora_kit loads the base (transformers' bitsandbytes integration, `Bnb4bitQuantize`), each
projection weight is first cast to the model's dtype, which is the compute dtype; a GPT-2 style
Conv1D weight, stored [in, out], is transposed to [out, in]; then bitsandbytes' `Params4bit` moves
it to the device, which calls `quantize_4bit` on the contiguous tensor with blocksize 64 (its
default), quant_type nf4, compress_statistics = double quantization and quant_storage uint8. The
same computation on the same kind of device gives the same bytes, and `dequantize_4bit` of them
gives, bit for bit, the weights the 4-bit layers computed with during training.

On CUDA `quantize_4bit` is called as it is. On the CPU its implementation is plain torch that makes
fp32 and int32 temporaries of the whole tensor (about 16 bytes per weight, 8x a bf16 tensor), so
here the same per-block op (`torch.ops.bitsandbytes.quantize_4bit`) runs on row chunks whose sizes
are whole 64-weight blocks, and the double-quantized state is then built from all block scales as
`quantize_4bit` builds it. Blocks are independent, so the bytes are the same; the tests check it.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnb_functional
import torch

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers does not override
NESTED_BLOCKSIZE = 256  # quantize_4bit's blocksize for the block scales
CHUNK_ELEMENTS = 8 << 20


def nf4_round_trip(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool, conv1d: bool,
                   device: torch.device, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """dequant(quant(W)) in `compute_dtype` on `device`, returned in the checkpoint's own layout.

    Args:
        weight: the checkpoint tensor (any float dtype); the caller should hold no other reference,
            so its memory is freed once it is quantized.
        compute_dtype: the dtype the run loaded the base in.
        double_quant: whether the block scales were quantized too.
        conv1d: the tensor is a GPT-2 Conv1D weight, stored [in, out].
        device: where to quantize (cuda when training ran on a GPU).
        chunk_elements: on the CPU, about how many weights are quantized at a time.
    """
    if device.type == "cpu":
        packed, state = _quantize_in_chunks(weight, compute_dtype, double_quant, conv1d, chunk_elements)
        del weight
    else:
        weight = weight.to(device=device, dtype=compute_dtype)
        weight = (weight.T if conv1d else weight).contiguous()
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8)
        del weight
    restored = bnb_functional.dequantize_4bit(packed, state)
    return restored.T if conv1d else restored


def _quantize_in_chunks(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool, conv1d: bool,
                        chunk_elements: int):
    """quantize_4bit of the [out, in] weight, a few rows at a time (each chunk a whole number of blocks)."""
    rows, columns = (weight.shape[1], weight.shape[0]) if conv1d else (weight.shape[0], weight.numel() // weight.shape[0])
    if weight.ndim != 2 or rows * columns <= chunk_elements:
        step = rows
    else:
        unit = BLOCKSIZE // math.gcd(columns, BLOCKSIZE)  # rows per whole number of blocks
        step = max(unit, chunk_elements // columns // unit * unit)
    packed_parts, absmax_parts = [], []
    for start in range(0, rows, step):
        part = weight[:, start:start + step].T if conv1d else weight[start:start + step]
        part = part.to(compute_dtype).contiguous()
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(part, BLOCKSIZE, "nf4", torch.uint8)
        packed_parts.append(packed)
        absmax_parts.append(absmax)
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    shape = torch.Size((rows, columns)) if weight.ndim == 2 else weight.shape
    code = bnb_functional.get_4bit_type("nf4", device=packed.device)
    if not double_quant:
        return packed, bnb_functional.QuantState(absmax=absmax, shape=shape, dtype=compute_dtype, blocksize=BLOCKSIZE,
                                                 code=code, quant_type="nf4")
    offset = absmax.mean()
    nested, nested_state = bnb_functional.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, bnb_functional.QuantState(absmax=nested, shape=shape, dtype=compute_dtype, blocksize=BLOCKSIZE,
                                             code=code, quant_type="nf4", offset=offset, state2=nested_state)


def compare_with_loader(model_dir, compute_dtype: torch.dtype, double_quant: bool, device: torch.device) -> dict:
    """Load `model_dir` as training does and check every 4-bit layer against `nf4_round_trip` of its checkpoint tensor.

    The 4-bit layers compute with dequantize_4bit(W) cast to the compute dtype (bitsandbytes' matmul_4bit
    casts it to its input's dtype); that is what is compared, bit for bit.

    Returns:
        {"layers": how many were compared, "equal": how many matched, "compute_dtype", "loaded_dtype"}.
    """
    from safetensors import safe_open

    from qlora_kit.config import ModelArguments
    from qlora_kit.export.layout import describe_base
    from qlora_kit.model.bnb_cpu import canonical_weight
    from qlora_kit.model.load import load_quantized_model

    layout = describe_base(model_dir, compute_dtype, double_quant)
    args = ModelArguments(model_name_or_path=str(model_dir), bnb_4bit_use_double_quant=double_quant)
    model = load_quantized_model(model_dir, args, compute_dtype, device)
    compared = equal = 0
    loaded_dtype = None
    for tensor in layout.tensors:
        if not tensor.quantized:
            continue
        weight = model.get_submodule(tensor.module).weight
        loaded = bnb_functional.dequantize_4bit(*canonical_weight(weight))
        loaded_dtype = loaded.dtype
        with safe_open(str(tensor.stored.file), framework="pt") as handle:
            ours = nf4_round_trip(handle.get_tensor(tensor.name), compute_dtype, double_quant, tensor.transposed, device)
        compared += 1
        equal += int(torch.equal(loaded.to(compute_dtype), ours.T if tensor.transposed else ours))
    return {"layers": compared, "equal": equal, "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "loaded_dtype": str(loaded_dtype).removeprefix("torch.")}
