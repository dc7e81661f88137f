"""The training loop, on accelerate's `Accelerator` so that several GPUs run through `accelerate launch`.

One optimizer step takes `gradient_accumulation_steps` micro-batches. Each micro-batch's loss is
its summed token loss divided by the trained tokens of the whole step, so every trained token
weighs the same however the tokens fall into micro-batches. Loss values leave the device only
at logging steps, so the loop does not wait on the GPU every step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm

from qlora_kit.config import TrainArguments
from qlora_kit.data.batches import collate, epoch_batches
from qlora_kit.log import logger
from qlora_kit.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from qlora_kit.train.loss import batch_loss_sum, count_trained_tokens
from qlora_kit.train.metrics import MetricsLog
from qlora_kit.train.optim import build_optimizer, build_scheduler


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step, and where the data stands after them."""

    micro_batches: list[dict[str, torch.Tensor]]
    epoch: int
    batch_in_epoch: int


def total_optimizer_steps(num_examples: int, args: TrainArguments) -> int:
    if args.max_steps > 0:
        return args.max_steps
    batches_per_epoch = math.ceil(num_examples / args.per_device_train_batch_size)
    return max(1, math.ceil(args.num_train_epochs * batches_per_epoch / args.gradient_accumulation_steps))


def step_batches(dataset: Dataset, args: TrainArguments, pad_id: int, state: TrainState) -> Iterator[StepBatch]:
    """Endless optimizer steps of micro-batches, epoch after epoch, starting at the state's position."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    epoch, index = state.epoch, state.batch_in_epoch
    batches = epoch_batches(lengths, args.per_device_train_batch_size, args.seed, epoch)
    while True:
        micro = []
        while len(micro) < args.gradient_accumulation_steps:
            if index == len(batches):
                epoch, index = epoch + 1, 0
                batches = epoch_batches(lengths, args.per_device_train_batch_size, args.seed, epoch)
            micro.append(collate([dataset[i] for i in batches[index]], pad_id))
            index += 1
        yield StepBatch(micro, epoch, index)


@torch.no_grad()
def evaluate(model, dataset: Dataset, batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean loss per trained token over a dataset."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum += batch_loss_sum(model, batch)
        tokens += int(count_trained_tokens(batch["labels"]))
    model.train()
    return loss_sum.item() / max(tokens, 1)


def train(
    model,
    train_dataset: Dataset,
    eval_dataset: Optional[Dataset],
    args: TrainArguments,
    accelerator: Accelerator,
    run_dir: Path,
    pad_id: int,
    resume_dir: Optional[Path] = None,
    step_driver: Optional[Callable[[list, int], torch.Tensor]] = None,
) -> TrainState:
    """Train the LoRA parameters of `model`; save checkpoints and log metrics in run_dir.

    `step_driver(micro_batches, step_trained)`, when given, runs a step's forward and backward
    itself and returns its summed token loss (qlora_kit.memory.reorder: layer-major order).
    """
    device = accelerator.device
    total_steps = total_optimizer_steps(len(train_dataset), args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, args, device)
    scheduler = build_scheduler(optimizer, args, total_steps)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    state = TrainState()
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model, optimizer, scheduler)
        metrics.truncate_after(state.step)
        logger.info(f"resumed from {resume_dir} at step {state.step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    batches = step_batches(train_dataset, args, pad_id, state)
    window_loss = torch.zeros((), device=device)
    window_tokens, window_inputs, window_start = 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    while state.step < total_steps:
        step = next(batches)
        step_trained = int(sum(count_trained_tokens(b["labels"]) for b in step.micro_batches))
        step_inputs = int(sum(b["attention_mask"].sum() for b in step.micro_batches))
        micro_batches = step.micro_batches
        if step_driver is not None:
            window_loss += step_driver(micro_batches, step_trained)
            micro_batches = []
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == len(step.micro_batches) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                loss_sum = batch_loss_sum(model, batch)
                accelerator.backward(loss_sum / max(step_trained, 1))
            window_loss += loss_sum.detach()
        grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.epoch, state.batch_in_epoch = step.epoch, step.batch_in_epoch
        state.trained_tokens += step_trained
        state.tokens_seen += step_inputs
        window_tokens += step_trained
        window_inputs += step_inputs
        bar.update(1)

        if state.step % args.logging_steps == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - window_start
            row = {
                "step": state.step,
                "loss": window_loss.item() / max(window_tokens, 1),
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_second": window_inputs / elapsed,
                "trained_tokens": state.trained_tokens,
                "epoch": state.epoch + state.batch_in_epoch / max(1, math.ceil(len(train_dataset) / args.per_device_train_batch_size)),
            }
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['learning_rate']:.1e}", tok_s=f"{row['tokens_per_second']:.0f}")
            window_loss.zero_()
            window_tokens, window_inputs, window_start = 0, 0, time.perf_counter()

        at_end = state.step == total_steps
        if eval_dataset is not None and ((args.eval_steps and state.step % args.eval_steps == 0) or at_end):
            eval_loss = evaluate(model, eval_dataset, args.per_device_eval_batch_size, pad_id, device)
            metrics.write({"step": state.step, "eval_loss": eval_loss})
            bar.write(f"step {state.step}: eval loss {eval_loss:.4f}")
        if (args.save_steps and state.step % args.save_steps == 0) or at_end:
            if accelerator.is_main_process:
                save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, state)
    bar.close()
    return state
