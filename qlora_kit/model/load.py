"""Loading the frozen base model in 4-bit NF4 with double quantization, and its tokenizer.

The projections become bitsandbytes `Linear4bit` layers holding packed uint8 NF4 weights with a
double-quantized state; embeddings, norms and lm_head stay unquantized in the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from qlora_kit.config import ModelArguments
from qlora_kit.errors import UserError
from qlora_kit.model.bnb_cpu import keep_canonical_layout
from qlora_kit.model.family import attention_for
from qlora_kit.log import notice_once

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def choose_compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Resolve 'auto' to bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if choice != "auto":
        return DTYPES[choice]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        notice_once("this GPU has no bfloat16: computing in float16")
        return torch.float16
    notice_once("no GPU: computing in float32, since bfloat16 matmuls are several times slower on CPU")
    return torch.float32


def quantization_config(args: ModelArguments, compute_dtype: torch.dtype,
                        quant_storage: torch.dtype = torch.uint8) -> BitsAndBytesConfig:
    """NF4 with (by default) double quantization, computing in `compute_dtype`.

    `quant_storage`: the dtype the packed 4-bit bytes are stored as (their bytes are the same). FSDP
    needs a floating dtype, the compute dtype, to split and gather them as it does the other weights.
    """
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_quantized_model(
    model_dir: Path, args: ModelArguments, compute_dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """Load a causal LM from a local folder with its projections in NF4, frozen, on `device`."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=quantization_config(args, compute_dtype),
            dtype=compute_dtype,
            device_map={"": device},
            trust_remote_code=args.trust_remote_code,
            attn_implementation=attention_for(model_dir, args.attn_implementation),
        )
    except ValueError as error:
        text = " ".join(str(error).split())
        if "trust_remote_code" in text:
            raise UserError(
                f"model {model_dir} needs its own code; pass --trust_remote_code true if you trust it"
            ) from None
        if "attn_implementation" in text or "attention" in text.lower():
            raise UserError(f"--attn_implementation {args.attn_implementation} does not work here: {text[:200]}") from None
        raise
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.config.use_cache = False
    return keep_canonical_layout(model)
