"""Side-by-side speed benchmark: the standard transformers + peft + bitsandbytes QLoRA loop vs qlora_kit.

Both sides train the same model (a local HF folder, or a config.json built with random NF4 weights)
on the same synthetic chat-like examples (lengths spread between seq_len/8 and seq_len, the first
part of each a prompt with labels -100) with the same LoRA settings (rank, alpha, dropout, every
linear projection):

- baseline: what the QLoRA paper's code and most tutorials do: `prepare_model_for_kbit_training`
  (every unquantized parameter upcast to fp32, reentrant gradient checkpointing), peft's
  "all-linear" LoRA, paged AdamW 32-bit, batches padded to their longest example in data order,
  and the model's own loss from `labels` (full logits).
- qlora_kit: the recipe's own path (load, LoRA, optimizer, batches and loss as the chat recipe
  builds them): no fp32 upcast of the frozen weights, packed rows (--packing true) so no padding is
  computed, and the chunked loss, which applies lm_head only to trained positions and never holds
  the full logits.

`run_side` runs one side in this process and returns its figures; `compare` runs each side in its
own subprocess, interleaved (A B A B ...), and reports medians and ratios. tools/bench.py is the
command line. Tokens/s counts trained tokens (not padding, not prompt).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from qlora_kit.bench.memory_track import peak_rss_bytes
from qlora_kit.bench.synthetic_data import synthetic_examples
from qlora_kit.data.tokenize import IGNORE_INDEX

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU figure, by device-name fragment.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A6000": 155e12}


@dataclass
class BenchSettings:
    model: str
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 8
    warmup: int = 2
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 0


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compute_dtype(device: torch.device) -> torch.dtype:
    from qlora_kit.model.load import choose_compute_dtype

    return choose_compute_dtype("auto", device)


def load_base(model: str, compute_dtype: torch.dtype, device: torch.device):
    """The frozen NF4 base: from a folder with weights, or random weights for a bare config.json."""
    from transformers import AutoConfig

    from qlora_kit.config import ModelArguments
    from qlora_kit.model.load import load_quantized_model
    from qlora_kit.bench.random_model import random_quantized_model

    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return random_quantized_model(AutoConfig.from_pretrained(path), compute_dtype, device)
    return load_quantized_model(path, ModelArguments(model_name_or_path=model), compute_dtype, device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def baseline_setup(settings: BenchSettings, device: torch.device, dtype: torch.dtype):
    """The standard recipe: prepare_model_for_kbit_training, all-linear LoRA, paged AdamW 32-bit."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base(settings.model, dtype, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()  # as Trainer does; from_pretrained returns eval mode, where checkpointing is skipped
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, optimizer


def baseline_batches(examples: list[dict], settings: BenchSettings, pad_id: int):
    """Batches in data order, padded to their longest example (what DataCollatorForSeq2Seq does)."""
    from qlora_kit.data.batches import collate

    for start in range(0, len(examples), settings.batch_size):
        yield collate(examples[start : start + settings.batch_size], pad_id)


def baseline_step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def qlora_kit_setup(settings: BenchSettings, device: torch.device, dtype: torch.dtype):
    """qlora_kit's own path, as the chat recipe builds it."""
    from qlora_kit.config import LoraArguments, TrainArguments
    from qlora_kit.model.lora import add_lora, choose_lora_dtype, enable_gradient_checkpointing
    from qlora_kit.train.optim import build_optimizer

    model = load_base(settings.model, dtype, device)
    enable_gradient_checkpointing(model)
    lora = LoraArguments(lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout)
    model = add_lora(model, lora, choose_lora_dtype("auto", dtype))
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainArguments(), device)
    return model, optimizer


def qlora_kit_batches(examples: list[dict], settings: BenchSettings, pad_id: int):
    """Batches as the recipe forms them with --packing true: rows of whole sequences, each attending to itself."""
    from datasets import Dataset

    from qlora_kit.data.batches import collate, epoch_batches
    from qlora_kit.data.packing import pack_dataset

    table = Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples])
    rows, _ = pack_dataset(table, settings.seq_len)
    rows = rows.to_list()
    lengths = [len(r["input_ids"]) for r in rows]
    for indices in epoch_batches(lengths, settings.batch_size, settings.seed, 0):
        yield collate([rows[i] for i in indices], pad_id)


def qlora_kit_step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    from qlora_kit.train.loss import batch_loss_sum

    loss_sum = batch_loss_sum(model, batch)
    (loss_sum / max(_trained_tokens(batch["labels"]), 1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


SIDES = {
    "baseline": (baseline_setup, baseline_batches, baseline_step),
    "qlora_kit": (qlora_kit_setup, qlora_kit_batches, qlora_kit_step),
}


def model_flops_per_token(model, seq_len: int) -> float:
    """6 x projection parameters + 4 x lm_head parameters + causal attention, per trained token."""
    import bitsandbytes as bnb

    config = model.config
    projections = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * (seq_len / 2)
    return 6 * projections + 4 * head + attention


def run_side(side: str, settings: BenchSettings) -> dict[str, Any]:
    """Train `settings.warmup + settings.steps` steps of one side here; return its measured figures."""
    setup, make_batches, step = SIDES[side]
    device, torch_seed = _device(), settings.seed
    torch.manual_seed(torch_seed)
    dtype = _compute_dtype(device)
    model, optimizer = setup(settings, device, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    total = settings.warmup + settings.steps
    examples = synthetic_examples(vocab, settings.seq_len, count=total * settings.batch_size * 4, seed=settings.seed)
    batches = make_batches(examples, settings, pad_id=0)
    times, tokens = [], 0
    for index in range(total):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        if index == settings.warmup:
            _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        step(model, optimizer, batch)
        _sync(device)
        if index >= settings.warmup:
            times.append(time.perf_counter() - start)
            tokens += _trained_tokens(batch["labels"])
    seconds = sum(times)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    result = {"side": side, "lora_b_norm": float(torch.stack([b.float().norm() for b in lora_b]).norm()),
              "device": _device_name(device), "compute_dtype": str(dtype).removeprefix("torch."),
              "tokens_per_second": tokens / seconds, "seconds_per_step": statistics.median(times),
              "trained_tokens": tokens, "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in result["device"]), None)
        if peak:
            result["mfu"] = model_flops_per_token(model, settings.seq_len) * result["tokens_per_second"] / peak
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{os.cpu_count()}"


def run_in_subprocess(side: str, settings: BenchSettings, timeout: Optional[float] = None) -> dict[str, Any]:
    """One side in a fresh Python process, so neither side's memory or caches affect the other."""
    command = [sys.executable, "-m", "qlora_kit.bench.training", side, json.dumps(asdict(settings))]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(settings: BenchSettings, repeats: int = 2, timeout: Optional[float] = None) -> dict[str, Any]:
    """Run baseline and qlora_kit interleaved `repeats` times each; medians and qlora_kit/baseline ratios."""
    runs: dict[str, list[dict]] = {"baseline": [], "qlora_kit": []}
    for _ in range(repeats):
        for side in ("baseline", "qlora_kit"):
            runs[side].append(run_in_subprocess(side, settings, timeout))
    summary: dict[str, Any] = {"settings": asdict(settings), "runs": runs, "median": {}}
    for side, results in runs.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
        summary["median"][side] = {k: statistics.median(r[k] for r in results) for k in keys}
        summary["median"][side]["device"] = results[0]["device"]
    base, ours = summary["median"]["baseline"], summary["median"]["qlora_kit"]
    summary["ratio"] = {k: ours[k] / base[k] for k in base if k in ours and isinstance(base[k], (int, float))
                        and base[k] and not math.isnan(base[k])}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A readable table of the medians and ratios."""
    rows = [("tokens/s (trained)", "tokens_per_second", "{:,.1f}"), ("s/step", "seconds_per_step", "{:.3f}"),
            ("peak RSS GiB", "peak_rss_bytes", "gib"), ("peak reserved GiB", "peak_reserved_bytes", "gib"),
            ("peak allocated GiB", "peak_allocated_bytes", "gib"), ("MFU", "mfu", "{:.1%}")]
    base, ours, ratio = summary["median"]["baseline"], summary["median"]["qlora_kit"], summary["ratio"]
    lines = [f"{'':22}{'baseline':>14}{'qlora_kit':>14}{'ratio':>8}"]
    for label, key, fmt in rows:
        if key not in base:
            continue
        show = (lambda v: f"{v / 2**30:.2f}") if fmt == "gib" else fmt.format
        lines.append(f"{label:22}{show(base[key]):>14}{show(ours[key]):>14}{ratio.get(key, float('nan')):>8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    side_name, raw = sys.argv[1], sys.argv[2]
    from qlora_kit.log import setup_logging

    setup_logging()
    print(json.dumps(run_side(side_name, BenchSettings(**json.loads(raw)))))
