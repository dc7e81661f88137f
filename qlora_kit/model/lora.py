"""LoRA injection through peft, gradient checkpointing, and the trainable-parameter report.

peft's `prepare_model_for_kbit_training` is not used: it upcasts every unquantized parameter
(embeddings and lm_head included) to fp32, which for a 70B model costs gigabytes for no
stability gain in the frozen layers. Here the base stays frozen in its compute dtype, and only
the adapters are cast, to `lora_dtype`.
"""

from __future__ import annotations

from collections import Counter

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from qlora_kit.config import LoraArguments
from qlora_kit.log import notice_once
from qlora_kit.model.bnb_cpu import four_bit_layers
from qlora_kit.model.load import DTYPES
from qlora_kit.model.targets import check_named_targets, find_projections


def choose_lora_dtype(choice: str, compute_dtype: torch.dtype) -> torch.dtype:
    """Resolve 'auto': bf16 adapters where the compute is bf16, fp32 otherwise (fp16 adapters underflow)."""
    if choice != "auto":
        return DTYPES[choice]
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Reentrant activation checkpointing, with gradients flowing from the frozen embeddings.

    Reentrant: each checkpointed layer's forward runs without building an autograd graph. The
    non-reentrant variant records one (for the frozen NF4 projections too), at the same speed but a
    much higher peak RSS: the graph's small allocations between large freed buffers keep glibc from
    reusing them (docs/benchmarks.md, the speed section, has the figures).
    """
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers >= 5.20
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def lora_config(model: PreTrainedModel, args: LoraArguments) -> LoraConfig:
    """The peft LoraConfig: every projection for 'all', otherwise the named modules."""
    if args.lora_target_modules.strip() == "all":
        target_modules: str | list[str] = find_projections(model).peft_target_regex()
    else:
        target_modules = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
        check_named_targets(model, target_modules)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, args: LoraArguments, lora_dtype: torch.dtype) -> PeftModel:
    """Wrap the frozen base with trainable LoRA adapters in `lora_dtype`."""
    peft_model = get_peft_model(model, lora_config(model, args), autocast_adapter_dtype=False)
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and parameter.dtype != lora_dtype:
            parameter.data = parameter.data.to(lora_dtype)
    return peft_model


def adapted_module_kinds(model: PeftModel) -> Counter:
    """How many LoRA layers sit on each kind of module, by the module's own name."""
    from peft.tuners.lora import LoraLayer

    return Counter(name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer))


def trainable_report(model: PeftModel) -> str:
    """One line: trainable / total parameters (NF4 counted unpacked, sharded ones whole) and the adapted module kinds."""
    unpacked = {id(layer.weight): layer.in_features * layer.out_features for layer in four_bit_layers(model)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(unpacked.get(id(p), p.numel()) for p in model.parameters())
    kinds = adapted_module_kinds(model)
    listed = ", ".join(f"{name} x{count}" for name, count in kinds.items())
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); LoRA on {listed}"


def log_dtype_choice(compute_dtype: torch.dtype, lora_dtype: torch.dtype) -> None:
    notice_once(f"frozen base computes in {str(compute_dtype).removeprefix('torch.')}, "
                f"LoRA weights in {str(lora_dtype).removeprefix('torch.')}")
