"""Measured peak memory of training steps next to the planner's prediction (tools/measure_memory.py).

A model is built from a config with random weights, quantized to NF4 layer by layer on the device
(never whole in bf16: an 8B model is 16 GB in bf16, 5.7 GB in NF4), then wrapped in LoRA exactly as
the recipe does. Each configuration (sequence length x chunked loss x activation offload) gets a
fresh optimizer, an emptied cache and reset peak statistics, then runs a few full steps (forward,
backward, optimizer step). On CUDA the peak is `torch.cuda.max_memory_reserved()` and
`max_memory_allocated()`; on CPU it is `LiveTensorBytes` (memory_track.py), which counts from before the
model is built, so its peak stands for max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Optional

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_kit.config import LoraArguments, TrainArguments
from qlora_kit.memory.budget import PlanSettings
from qlora_kit.memory.offload import enable_activation_offload
from qlora_kit.memory.plan import GiB, plan_memory
from qlora_kit.memory.shapes import ModelShape, load_model_config, meta_model, shape_from_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.bench.random_model import random_quantized_model
from qlora_kit.train.loss import batch_loss_sum, set_loss_chunk_size
from qlora_kit.train.optim import build_optimizer

PADDING = 16  # padded positions at the end of each row, so the padding-mask path runs as in real batches


def random_batch(batch_size: int, seq_length: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens, every position trained except a padded tail."""
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_length), device=device)
    attention_mask = torch.ones_like(input_ids)
    pad = min(PADDING, seq_length // 4)
    attention_mask[:, seq_length - pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclasses.dataclass
class Measurement:
    model: str
    micro_batch_size: int
    max_seq_length: int
    loss_chunk_size: int
    offload_activations: bool
    measured_reserved_bytes: Optional[int]
    measured_allocated_bytes: int
    predicted_reserved_bytes: int
    predicted_allocated_bytes: int
    seconds_per_step: float
    device: str

    @property
    def error(self) -> float:
        """Predicted / measured - 1, on reserved memory where there is one (CUDA), else allocated."""
        if self.measured_reserved_bytes is not None:
            return self.predicted_reserved_bytes / self.measured_reserved_bytes - 1
        return self.predicted_allocated_bytes / self.measured_allocated_bytes - 1


def predicted(shape: ModelShape, settings: PlanSettings, device: torch.device) -> tuple[int, int]:
    """The planner's reserved and allocated bytes (allocated: without the allocator slack, and on
    CPU without cuBLAS workspaces)."""
    plan = plan_memory(shape, settings, gpu_bytes=1 << 50, host_bytes=1 << 50)
    not_allocated = {"allocator slack"} | ({"cuBLAS workspaces"} if device.type != "cuda" else set())
    extra = sum(r.bytes for r in plan.rows if r.name in not_allocated)
    return plan.predicted_allocator_bytes, plan.predicted_allocator_bytes - extra


class _Peaks:
    """Reset and read peak memory: CUDA's statistics, or a LiveTensorBytes on CPU."""

    def __init__(self, device: torch.device, tracker=None) -> None:
        self.device, self.tracker = device, tracker

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker.reset_peak()

    def read(self) -> tuple[Optional[int], int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_reserved(self.device), torch.cuda.max_memory_allocated(self.device)
        return None, self.tracker.peak


def measure_configuration(model: nn.Module, settings: PlanSettings, vocab_size: int, device: torch.device,
                          peaks: _Peaks, steps: int) -> tuple[Optional[int], int, float]:
    """Run `steps` training steps with a fresh optimizer; return peak reserved, allocated, s/step."""
    offloader = enable_activation_offload(model, device) if settings.offload_activations else None
    set_loss_chunk_size(model, settings.loss_chunk_size)
    batch = random_batch(settings.micro_batch_size, settings.max_seq_length, vocab_size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, TrainArguments(optim=settings.optim), device)
    peaks.reset()
    start = time.perf_counter()
    for _ in range(steps):
        loss = batch_loss_sum(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    reserved, allocated = peaks.read()
    seconds = (time.perf_counter() - start) / steps
    if offloader is not None:
        offloader.disable()
    del optimizer, batch, loss
    return reserved, allocated, seconds


def measure_model(name: str, seq_lengths: list[int], batch_size: int, device: torch.device, steps: int,
                  config_overrides: Optional[dict] = None, tracker=None) -> list[Measurement]:
    """Every (sequence length, chunked loss, offload) configuration of one model shape."""
    config = load_model_config(name)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    shape = shape_from_model(meta_model(config), config)
    attn = "sdpa" if shape.supports_sdpa else "eager"
    model = random_quantized_model(config, dtype, device, attn_implementation=attn).train()
    enable_gradient_checkpointing(model)
    model = add_lora(model, LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.05), dtype)
    peaks = _Peaks(device, tracker)
    results = []
    for seq in seq_lengths:
        for chunk in (0, None):
            for offload in (False, True):
                settings = PlanSettings(micro_batch_size=batch_size, max_seq_length=seq, lora_r=16, lora_dropout=0.05,
                                       optim="paged_adamw_8bit", compute_dtype=dtype_name, lora_dtype=dtype_name,
                                       attn_implementation=attn, offload_activations=offload, loss_chunk_size=chunk)
                plan = plan_memory(shape, settings, 1 << 50, 1 << 50)
                trained = (seq - min(PADDING, seq // 4) - 1) / seq
                settings = dataclasses.replace(settings, loss_chunk_size=plan.loss_chunk_size, trained_fraction=trained)
                reserved, allocated, seconds = measure_configuration(model, settings, shape.vocab_size, device, peaks, steps)
                pred_reserved, pred_allocated = predicted(shape, settings, device)
                label = name + (" (shrunk)" if config_overrides else "")
                results.append(Measurement(label, batch_size, seq, settings.loss_chunk_size, offload, reserved, allocated,
                                           pred_reserved, pred_allocated, seconds, str(device)))
    return results


def format_measurements(rows: list[Measurement]) -> str:
    """A readable table: measured against predicted, in GiB."""
    lines = [f"{'model':32} {'B x T':>10} {'chunk':>6} {'offload':>7} {'reserved':>9} {'alloc':>9} "
             f"{'pred.res':>9} {'pred.alloc':>10} {'error':>7} {'s/step':>7}"]
    for r in rows:
        reserved = "-" if r.measured_reserved_bytes is None else f"{r.measured_reserved_bytes / GiB:.3f}"
        lines.append(f"{r.model:32} {f'{r.micro_batch_size}x{r.max_seq_length}':>10} {r.loss_chunk_size:>6} "
                     f"{str(r.offload_activations).lower():>7} {reserved:>9} {r.measured_allocated_bytes / GiB:9.3f} "
                     f"{r.predicted_reserved_bytes / GiB:9.3f} {r.predicted_allocated_bytes / GiB:10.3f} "
                     f"{r.error:+7.1%} {r.seconds_per_step:7.2f}")
    return "\n".join(lines)


# --tiny: the same two shapes, shrunk so a CPU runs every configuration in about a minute.
TINY_OVERRIDES = {
    "smollm2-135m-instruct": {"num_hidden_layers": 2},
    "llama-3.1-8b": {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 64},
}


def _environment(device: torch.device) -> dict:
    import transformers

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bnb.__version__}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        info["outside_allocator_bytes"] = total - free - torch.cuda.memory_reserved(device)
        info["total_bytes"] = total
    return info


def measure_command(argv: list[str]) -> list[Measurement]:
    """tools/measure_memory.py: measure every configuration, print a table and JSON, write --out."""
    import argparse
    import json
    from pathlib import Path

    from qlora_kit.errors import UserError
    from qlora_kit.bench.memory_track import LiveTensorBytes

    parser = argparse.ArgumentParser(prog="python tools/measure_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes at short sequences (runs on CPU)")
    parser.add_argument("--models", default="smollm2-135m-instruct,llama-3.1-8b", help="shipped shape names or config.json paths")
    parser.add_argument("--seq", default=None, help="sequence lengths (default 1024,4096; --tiny: 64,128)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch size (default 1; --tiny: 2)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.tiny:
        raise UserError("no GPU here: pass --tiny to measure shrunk shapes on the CPU")
    seqs = [int(s) for s in (args.seq or ("64,128" if args.tiny else "1024,4096")).split(",")]
    batch = args.batch or (2 if args.tiny else 1)
    rows: list[Measurement] = []
    start = time.perf_counter()
    tracker = LiveTensorBytes() if device.type == "cpu" else None
    if tracker is not None:
        tracker.__enter__()
    try:
        for name in args.models.split(","):
            overrides = TINY_OVERRIDES.get(name, {"num_hidden_layers": 2}) if args.tiny else None
            rows += measure_model(name, seqs, batch, device, args.steps, overrides, tracker)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    report = {"environment": _environment(device), "seconds": round(time.perf_counter() - start, 1),
              "rows": [{**dataclasses.asdict(r), "error": round(r.error, 4)} for r in rows]}
    print(format_measurements(rows))
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return rows
