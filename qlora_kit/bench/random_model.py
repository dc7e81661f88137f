"""Random-weight models and matching random LoRA runs of real shapes, for benchmarks and GPU checks.

A model is written tensor by tensor (in row chunks) with the streaming shard writer, so a 8B shape
never sits in RAM; the run folder beside it is a real PEFT adapter (peft's LoraConfig, safetensors
with peft's key names) with run_config.yaml, as the chat recipe writes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from qlora_kit.config import DataArguments, LoraArguments, ModelArguments, RunConfig, TrainArguments, write_run_config
from qlora_kit.export.adapter import PREFIX
from qlora_kit.export.layout import meta_model
from qlora_kit.export.merge import row_ranges
from qlora_kit.fingerprint import model_fingerprint
from qlora_kit.io.safetensors import TensorSpec
from qlora_kit.io.shards import ShardWriter, plan_shards, write_index
from qlora_kit.model.load import DTYPES
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


def _random_rows(spec: TensorSpec, start: int, stop: int, generator: torch.Generator, std: float) -> torch.Tensor:
    device = generator.device
    if len(spec.shape) == 1:  # norms start at one, biases at zero
        fill = 1.0 if spec.name.endswith("weight") else 0.0
        return torch.full((stop - start,), fill, dtype=spec.dtype, device=device)
    shape = (stop - start, *spec.shape[1:])
    return (torch.randn(shape, generator=generator, device=device) * std).to(spec.dtype)


def write_random_model(folder: Path, config, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "2GB",
                       seed: int = 0, device: str = "cpu") -> Path:
    """Write a random-weight model folder (config.json + safetensors shards), a row chunk at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = state_specs(config, dtype)
    shards = plan_shards(specs, max_shard_size)
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
    config = RunConfig(ModelArguments(model_name_or_path=str(base_dir)), lora_args, DataArguments(),
                       TrainArguments(output_dir=str(run_dir)))
    write_run_config(config, run_dir / "run_config.yaml", resolved={
        "base_model_dir": str(base_dir), "compute_dtype": compute_dtype,
        "lora_dtype": str(lora_dtype).removeprefix("torch."), "quantization": {"quant_type": "nf4", "double_quant": True},
        "model_fingerprint": model_fingerprint(base_dir),
    })
    return run_dir
