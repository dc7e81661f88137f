"""Random-weight models for tests and benchmarks, in memory or on disk, and random LoRA runs for them.

`random_model` is transformers' own seeded init (small shapes), saved by `save_random_model`.
`random_quantized_model` is never whole in bf16: built on the meta device with its projections
already `Linear4bit`, as the streaming loader builds it, each projection gets a random weight
quantized on `device` before the next is drawn: the kind of model `load_quantized_model` returns,
for shapes (8B, 70B) whose weights cannot travel. `write_random_model` writes a folder tensor by
tensor (in row chunks) with the streaming shard writer, so an 8B shape never sits in RAM.
`write_random_run` writes a real PEFT adapter (random A, B != 0) with run_config.yaml as the chat
recipe writes it (`write_run_record`); `perturb_adapter` gives an adapter in memory a trained look.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from qlora_kit.config import DataArguments, LoraArguments, ModelArguments, RunConfig, TrainArguments, write_run_config
from qlora_kit.export.adapter import PREFIX
from qlora_kit.export.layout import meta_model
from qlora_kit.export.merge import row_ranges
from qlora_kit.fingerprint import model_fingerprint
from qlora_kit.io.safetensors import TensorSpec
from qlora_kit.io.shards import ShardWriter, plan_shards, write_index
from qlora_kit.model.load import DTYPES
from qlora_kit.model.stream_load import build_empty_model
from qlora_kit.model.targets import find_projections

# Llama shapes: ~1.5B parameters (the CPU benchmark), Llama-3.1-8B's, and a tiny one for tests.
PRESETS = {
    "llama-1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=22, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}


def preset_config(preset: str, num_layers: Optional[int] = None) -> LlamaConfig:
    """A Llama config of a preset shape, optionally with fewer (or more) decoder layers."""
    values = dict(PRESETS[preset], tie_word_embeddings=False, max_position_embeddings=8192)
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    return LlamaConfig(**values)


# ---- in memory ----------------------------------------------------------------------------------------------

def random_model(config: PretrainedConfig, seed: int = 0, dtype: Optional[torch.dtype] = None) -> PreTrainedModel:
    """A causal LM of `config` with transformers' init after `torch.manual_seed(seed)`, in eval mode.

    Args:
        dtype: cast the model to it after the init (the values are drawn in float32 either way).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, std: float,
                  ones: bool = False) -> torch.Tensor:
    """A parameter's random start, drawn on `device` from torch's global generator: N(0, std), or ones (a norm)."""
    if ones:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0, std)


def _quantized_random_weight(layer: bnb.nn.Linear4bit, std: float, device: torch.device, dtype: torch.dtype):
    weight = random_tensor((layer.out_features, layer.in_features), dtype, device, std)
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
            is_norm = not isinstance(module, (nn.Embedding, nn.Linear))  # norm weights and the like
            data = random_tensor(parameter.shape, parameter.dtype, device, std, ones=is_norm)
            setattr(module, name, nn.Parameter(data, requires_grad=False))
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer.to(device), persistent=name not in module._non_persistent_buffers_set)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


# ---- on disk ------------------------------------------------------------------------------------------------

def save_random_model(folder: Path, config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      **save_options: Any) -> Path:
    """Write `random_model(config, seed)` in `dtype` as an HF folder (safetensors); `save_options` go to
    `save_pretrained` (e.g. max_shard_size)."""
    random_model(config, seed, dtype).save_pretrained(folder, **save_options)
    return folder


def state_specs(config, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor a checkpoint of this config holds (tied weights once), in state-dict order."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    specs = []
    for name, tensor in model.state_dict().items():
        if name not in tied:
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype if tensor.is_floating_point() else tensor.dtype))
    return specs


def layer_shards(specs: list[TensorSpec], layers_per_shard: int) -> dict[str, list[TensorSpec]]:
    """Shards of `layers_per_shard` decoder layers each (layers-000.safetensors, ...), the rest in rest.safetensors."""
    shards: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        layer = spec.name.split("layers.")[1].split(".")[0] if ".layers." in spec.name else None
        key = f"layers-{int(layer) // layers_per_shard:03d}" if layer is not None else "rest"
        shards.setdefault(f"{key}.safetensors", []).append(spec)
    return shards


def _random_rows(spec: TensorSpec, start: int, stop: int, generator: torch.Generator, std: float) -> torch.Tensor:
    device = generator.device
    if len(spec.shape) == 1:  # norms start at one, biases at zero
        fill = 1.0 if spec.name.endswith("weight") else 0.0
        return torch.full((stop - start,), fill, dtype=spec.dtype, device=device)
    shape = (stop - start, *spec.shape[1:])
    return (torch.randn(shape, generator=generator, device=device) * std).to(spec.dtype)


def write_random_model(folder: Path, config, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "2GB",
                       seed: int = 0, device: str = "cpu", layers_per_shard: Optional[int] = None) -> Path:
    """Write a random-weight model folder (config.json + safetensors shards), a row chunk at a time.

    Args:
        max_shard_size: the largest shard, when `layers_per_shard` is not given.
        device: where the random numbers are drawn.
        layers_per_shard: shard by decoder layers instead (`layer_shards`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    specs = state_specs(config, dtype)
    shards = layer_shards(specs, layers_per_shard) if layers_per_shard else plan_shards(specs, max_shard_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    for filename, shard_specs in shards.items():
        with ShardWriter(folder / filename, shard_specs) as writer:
            for spec in shard_specs:
                for start, stop in row_ranges(spec.shape):
                    writer.write(_random_rows(spec, start, stop, generator, std).cpu())
    write_index(folder, shards)
    config.dtype = dtype
    config.save_pretrained(folder)
    return folder


# ---- random LoRA runs ---------------------------------------------------------------------------------------

def perturb_adapter(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give the adapter weights a trained look: B (zero at init) and the DoRA magnitudes move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))


def write_run_record(run_dir: Path, model_args: ModelArguments, lora_args: LoraArguments, compute_dtype: str,
                     lora_dtype: str, device: Optional[str] = None) -> Path:
    """Write run_dir/run_config.yaml as the chat recipe does, for a run on the base in `model_args`."""
    base_dir = model_args.model_name_or_path
    config = RunConfig(model_args, lora_args, DataArguments(), TrainArguments(output_dir=str(run_dir)))
    resolved: dict[str, Any] = {"base_model_dir": base_dir, "compute_dtype": compute_dtype, "lora_dtype": lora_dtype,
                                "quantization": {"quant_type": "nf4", "double_quant": True}}
    if device is not None:
        resolved["device"] = device
    resolved["model_fingerprint"] = model_fingerprint(Path(base_dir))
    path = run_dir / "run_config.yaml"
    write_run_config(config, path, resolved=resolved)
    return path


def write_random_run(run_dir: Path, base_dir: Path, lora_r: int = 16, lora_alpha: float = 32, seed: int = 0,
                     compute_dtype: str = "bfloat16", lora_dtype: torch.dtype = torch.bfloat16,
                     use_rslora: bool = False) -> Path:
    """A run folder with a random LoRA adapter (B != 0) on every projection of the model in `base_dir`."""
    model = meta_model(base_dir, DTYPES[compute_dtype], double_quant=True, trust_remote_code=False)
    target = find_projections(model).peft_target_regex()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if re.fullmatch(target, name):
            bound = module.in_features ** -0.5
            a = (torch.rand(lora_r, module.in_features, generator=generator) * 2 - 1) * bound
            b = torch.randn(module.out_features, lora_r, generator=generator) * 0.01
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(lora_dtype)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(lora_dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, run_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=target, use_rslora=use_rslora, lora_dropout=0.0,
               task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir)).save_pretrained(run_dir)
    lora_args = LoraArguments(lora_r=lora_r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    write_run_record(run_dir, ModelArguments(model_name_or_path=str(base_dir)), lora_args, compute_dtype,
                     str(lora_dtype).removeprefix("torch."))
    return run_dir
