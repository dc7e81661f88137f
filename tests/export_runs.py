"""Run folders for the export tests: a tiny base, a real peft adapter trained-looking (B != 0), run_config.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from qlora_kit.bench.random_model import perturb_adapter, write_run_record
from qlora_kit.config import LoraArguments, ModelArguments
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora
from tiny_models import save_tiny_model

CPU = torch.device("cpu")


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
    write_run_record(run, model_args, lora_args, str(compute_dtype).removeprefix("torch."), "float32", device="cpu")
    return base, run, adapted.eval()
