"""Run folders for the export tests: a tiny base, a real peft adapter trained-looking (B != 0), run_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from qlora_kit.config import DataArguments, LoraArguments, ModelArguments, RunConfig, TrainArguments, write_run_config
from qlora_kit.fingerprint import model_fingerprint
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora
from tiny_models import save_tiny_model

CPU = torch.device("cpu")


def perturb_adapter(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give the adapter weights a trained look: B (zero at init) and the DoRA magnitudes move."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))


def make_run(folder: Path, architecture: str = "llama", compute_dtype: torch.dtype = torch.float32,
             base_dtype: torch.dtype = torch.bfloat16, tokenizer=None, model_overrides: Optional[dict] = None,
             scale: float = 0.05, **lora):
    """Write folder/base and folder/run; return (base_dir, run_dir, the adapter model in eval mode).

    `model_overrides` change the tiny model's config; `scale` sets the size of the adapter's B; `lora` the
    LoraArguments.
    """
    base = save_tiny_model(folder / "base", architecture, dtype=base_dtype, **(model_overrides or {}))
    return adapt_and_save(base, folder / "run", compute_dtype, tokenizer, scale, **lora)


def adapt_and_save(base: Path, run: Path, compute_dtype: torch.dtype = torch.float32, tokenizer=None,
                   scale: float = 0.05, **lora):
    """Write a run folder for the model in `base`: a trained-looking adapter and run_config.yaml; return
    (base, run, the adapter model in eval mode)."""
    model_args = ModelArguments(model_name_or_path=str(base))
    model = load_quantized_model(base, model_args, compute_dtype, CPU)
    lora_args = LoraArguments(**{"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **lora})
    adapted = add_lora(model, lora_args, lora_dtype=torch.float32)
    perturb_adapter(adapted, scale=scale)
    adapted.save_pretrained(run)
    if tokenizer is not None:
        tokenizer.save_pretrained(run)
    config = RunConfig(model_args, lora_args, DataArguments(), TrainArguments(output_dir=str(run)))
    write_run_config(config, run / "run_config.yaml", resolved={
        "base_model_dir": str(base), "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "lora_dtype": "float32", "quantization": {"quant_type": "nf4", "double_quant": True}, "device": "cpu",
        "model_fingerprint": model_fingerprint(base),
    })
    return base, run, adapted.eval()
