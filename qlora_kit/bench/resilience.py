"""Checks and measurements of the crash-safety machinery: is resuming exact here, and what does safety cost.

Is resuming exact? Train N steps straight through, and again from the checkpoint at step k; compare.

A random-weight Llama built from a config (no weights to download or carry) is quantized to NF4
and trained with LoRA (dropout on, gradient checkpointing on) on synthetic tokens, through the
same `train` loop as the recipe. Three runs: A straight through N steps (saving at step k), B
the same again (on a GPU, B against A is the noise floor of non-deterministic kernels), and C
resumed from A's step-k checkpoint. The report gives, for C against A and B against A, whether
the per-step losses, the final adapter and the optimizer state are bit-identical, and the
largest differences where they are not.

`measure_costs` times the non-finite guard (steps with it on against off, in the same process)
and a checkpoint's write and validation.

`tools/check_exact_resume.py` and `tools/bench_checkpoint.py` run them from the command line.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from datasets import Dataset
from safetensors.torch import load_file
from transformers import set_seed

from qlora_kit.bench.random_model import save_random_model
from qlora_kit.bench.synthetic_data import synthetic_dataset
from qlora_kit.config import LoraArguments, ModelArguments, TrainArguments
from qlora_kit.model.load import choose_compute_dtype, load_quantized_model
from qlora_kit.model.lora import add_lora, choose_lora_dtype, enable_gradient_checkpointing
from qlora_kit.train.metrics import MetricsLog

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096),
}
# LoRA rank per size: at r=64 the MLP adapters of "small" reach 131k values, above the 1e5 from which
# bitsandbytes pages an optimizer state, so the paged path is exercised.
LORA_RANK = {"tiny": 8, "small": 64}
PAD_ID = 0


def write_random_llama(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight Llama of the named size, saved in bf16 as an HF folder."""
    config = transformers.LlamaConfig(max_position_embeddings=512, pad_token_id=PAD_ID, **SIZES[size])
    return save_random_model(folder, config, torch.bfloat16, seed)


def train_once(model_dir: Path, dataset: Dataset, args: TrainArguments, lora: LoraArguments, device: torch.device,
               resume_dir: Optional[Path] = None):
    """One training run as the recipe does it (seed, NF4 load, checkpointing, LoRA), without the chat data stage."""
    from qlora_kit.train.loop import make_accelerator, train

    set_seed(args.seed)
    compute_dtype = choose_compute_dtype("auto", device)
    model = load_quantized_model(model_dir, ModelArguments(model_name_or_path=str(model_dir)), compute_dtype, device)
    enable_gradient_checkpointing(model)
    model = add_lora(model, lora, choose_lora_dtype("auto", compute_dtype))
    accelerator = make_accelerator(cpu=device.type == "cpu")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return train(model, dataset, None, args, accelerator, Path(args.output_dir), PAD_ID, resume_dir=resume_dir)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in MetricsLog(run_dir / "metrics.jsonl").rows() if "loss" in row}


def _max_tensor_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def compare_runs(first: Path, second: Path, step: int) -> dict[str, Any]:
    """Per-step losses and the step's checkpoint (adapter and optimizer state) of two runs, side by side."""
    losses_a, losses_b = step_losses(first), step_losses(second)
    shared = sorted(set(losses_a) & set(losses_b))
    loss_diff = max((abs(losses_a[s] - losses_b[s]) for s in shared), default=float("inf"))
    result: dict[str, Any] = {
        "steps_compared": shared,
        "losses_identical": bool(shared) and all(losses_a[s] == losses_b[s] for s in shared),
        "loss_max_abs_diff": loss_diff,
    }
    for name in ("adapter_model", "optimizer"):
        file_a = first / "checkpoints" / f"step-{step}" / f"{name}.safetensors"
        file_b = second / "checkpoints" / f"step-{step}" / f"{name}.safetensors"
        result[f"{name}_bytes_identical"] = file_a.read_bytes() == file_b.read_bytes()
        result[f"{name}_max_abs_diff"] = _max_tensor_difference(load_file(file_a), load_file(file_b))
    return result


def paged_state_roundtrip(device: torch.device) -> Optional[dict[str, bool]]:
    """On CUDA: does a paged 8-bit optimizer's state stay paged, and bit-identical, through save and load,
    and does the non-finite guard leave it (and the weights) untouched on a NaN step?"""
    if device.type != "cuda":
        return None
    import tempfile

    import bitsandbytes as bnb

    from qlora_kit.train.guard import NonfiniteGuard
    from qlora_kit.train.state_io import load_optimizer, save_optimizer

    parameter = torch.nn.Parameter(torch.randn(512, 512, device=device))  # 262k values: paged
    first = bnb.optim.PagedAdamW8bit([parameter], lr=1e-3)
    guard = NonfiniteGuard(first, 3, device)
    parameter.grad = torch.randn_like(parameter)
    guard.check(torch.tensor(1.0, device=device), parameter.grad.norm())
    first.step()
    state = first.state[parameter]
    keys = ("state1", "state2", "absmax1", "absmax2")
    before = {k: state[k].clone() for k in keys} | {"weight": parameter.detach().clone()}
    parameter.grad = torch.full_like(parameter, float("nan"))
    guard.check(torch.tensor(float("nan"), device=device), parameter.grad.norm())
    first.step()
    after = {k: state[k] for k in keys} | {"weight": parameter.detach()}
    with tempfile.TemporaryDirectory() as folder:
        save_optimizer(first, Path(folder))
        second = bnb.optim.PagedAdamW8bit([parameter], lr=1e-3)
        load_optimizer(second, Path(folder))
    loaded = second.state[parameter]
    return {
        "paged_before": bool(getattr(state["state1"], "is_paged", False)),
        "guard_skip_keeps_state": all(torch.equal(before[k].cpu(), after[k].cpu()) for k in before),
        "paged_after_load": bool(getattr(loaded["state1"], "is_paged", False)),
        "state_identical": all(torch.equal(state[k].cpu(), loaded[k].cpu()) for k in keys),
    }


def guard_sync_check(device: torch.device) -> Optional[str]:
    """On CUDA: run the guard's per-step work with CUDA's sync debug mode set to error; 'none' if nothing synced."""
    if device.type != "cuda":
        return None
    import bitsandbytes as bnb

    from qlora_kit.train.guard import NonfiniteGuard
    from qlora_kit.train.loop import LogWindow

    parameter = torch.nn.Parameter(torch.randn(4096, device=device))
    guard = NonfiniteGuard(bnb.optim.PagedAdamW8bit([parameter]), 3, device)
    window = LogWindow(device, {})
    loss, grad_norm = torch.tensor(float("nan"), device=device), torch.tensor(1.0, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        applied = guard.check(loss, grad_norm)
        saved = parameter.detach().clone()
        torch.where(applied, parameter.data, saved, out=parameter.data)  # what the wrapped update_step does
        guard.after_step(1)
        window.add(loss, 10, 12, applied)
        return "none"
    except RuntimeError as error:
        return str(error)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _reported(check, device: torch.device) -> Any:
    """A sub-check's result, or its error as text, so that one failure does not hide the other results."""
    try:
        return check(device)
    except Exception as error:  # noqa: BLE001 - reported, not swallowed
        return {"error": f"{type(error).__name__}: {error}"}


def check_exact_resume(work: Path, size: str = "tiny", steps: int = 6, stop_at: int = 3,
                       optim: str = "paged_adamw_8bit", device: Optional[torch.device] = None,
                       batch_size: int = 4, max_length: int = 64, noise_floor: bool = True,
                       **train_fields: Any) -> dict[str, Any]:
    """Runs A (straight), B (straight again, if `noise_floor`) and C (resumed from A at `stop_at`); compares them.

    `train_fields` override TrainArguments fields (for example logging_steps).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    paged, syncs = _reported(paged_state_roundtrip, device), _reported(guard_sync_check, device)
    model_dir = write_random_llama(work / "model", size)
    dataset = synthetic_dataset(64, max_length, SIZES[size]["vocab_size"])
    lora = LoraArguments(lora_r=LORA_RANK[size], lora_alpha=2 * LORA_RANK[size], lora_dropout=0.1)
    fields = dict(max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=2,
                  learning_rate=1e-3, warmup_ratio=0.2, logging_steps=1, save_steps=stop_at, optim=optim)
    base = TrainArguments(**{**fields, **train_fields})
    run_a, run_b, run_c = work / "straight", work / "straight-again", work / "resumed"
    train_once(model_dir, dataset, replace(base, output_dir=str(run_a)), lora, device)
    if noise_floor:
        train_once(model_dir, dataset, replace(base, output_dir=str(run_b)), lora, device)
    train_once(model_dir, dataset, replace(base, output_dir=str(run_c)), lora, device,
               resume_dir=run_a / "checkpoints" / f"step-{stop_at}")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "torch": torch.__version__,
        "size": size, "optim": optim, "steps": steps, "stop_at": stop_at,
        "resumed_vs_straight": compare_runs(run_a, run_c, steps),
        "straight_vs_straight": compare_runs(run_a, run_b, steps) if noise_floor else None,
        "paged_state_roundtrip": paged, "guard_device_syncs": syncs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure_costs(work: Path, model_dir: Path, device: torch.device, steps: int = 10, optim: str = "paged_adamw_8bit",
                  batch_size: int = 4, max_length: int = 64, repeats: int = 2) -> dict[str, Any]:
    """Seconds per step with the non-finite guard on and off (alternating runs), and a checkpoint's I/O.

    Step times come from the loop's own logged throughput over all `steps` (setup and the final
    checkpoint are outside it); the fastest of `repeats` runs counts.
    """
    from qlora_kit.train.checkpoint import checkpoint_bytes, validate_checkpoint
    from qlora_kit.train.loop import make_accelerator, train

    set_seed(0)
    compute_dtype = choose_compute_dtype("auto", device)
    model = load_quantized_model(model_dir, ModelArguments(model_name_or_path=str(model_dir)), compute_dtype, device)
    enable_gradient_checkpointing(model)
    model = add_lora(model, LoraArguments(lora_r=16, lora_alpha=32), choose_lora_dtype("auto", compute_dtype))
    vocab = model.get_input_embeddings().num_embeddings
    dataset = synthetic_dataset(steps * batch_size, max_length, vocab)
    accelerator = make_accelerator(cpu=device.type == "cpu")
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(2 * repeats + 1):  # the first run warms up and is not counted
        guard = "on" if index % 2 else "off"
        args = TrainArguments(output_dir=str(work / f"run-{index}"), max_steps=steps, per_device_train_batch_size=batch_size,
                              logging_steps=steps, save_steps=steps + 1, optim=optim,
                              max_nonfinite_steps=5 if guard == "on" else 0)
        Path(args.output_dir).mkdir(parents=True)
        state = train(model, dataset, None, args, accelerator, Path(args.output_dir), PAD_ID)
        throughput = MetricsLog(Path(args.output_dir) / "metrics.jsonl").rows()[-1]["tokens_per_second"]
        if index:  # the loop's own timing of its steps, without setup and the final checkpoint
            seconds[guard].append(state.tokens_seen / throughput / steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    folder, write_s = write_stepped_checkpoint(work / "io", model, optim, device)
    started = time.perf_counter()
    validate_checkpoint(folder)
    validate_s = time.perf_counter() - started
    on, off = min(seconds["on"]), min(seconds["off"])
    return {
        "step_seconds_guard_off": round(off, 4), "step_seconds_guard_on": round(on, 4),
        "guard_time_ratio": round(on / off, 3),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "checkpoint_bytes": sum(p.stat().st_size for p in folder.iterdir()),
        "checkpoint_bytes_estimate": checkpoint_bytes(model, optim),
        "checkpoint_write_seconds": round(write_s, 3), "checkpoint_validate_seconds": round(validate_s, 3),
    }


def write_stepped_checkpoint(run_dir: Path, model, optim: str, device: torch.device) -> tuple[Path, float]:
    """Write a checkpoint (step-1) of `model` after one optimizer step on all-ones gradients, so every
    optimizer state exists; return its folder and the seconds the write took."""
    from qlora_kit.train.checkpoint import TrainState, save_checkpoint
    from qlora_kit.train.optim import build_optimizer, build_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    args = TrainArguments(optim=optim)
    optimizer = build_optimizer(trainable, args, device)
    for parameter in trainable:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    scheduler = build_scheduler(optimizer, args, 10)
    started = time.perf_counter()
    folder = save_checkpoint(run_dir, model, optimizer, scheduler, TrainState(step=1))
    return folder, time.perf_counter() - started


def print_report(report: dict[str, Any], out: Optional[str]) -> None:
    """Print a report as JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
