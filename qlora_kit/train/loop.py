"""The training loop, on accelerate's `Accelerator` so that several GPUs run through `accelerate launch`.

One optimizer step takes `gradient_accumulation_steps` micro-batches. Each micro-batch's loss is
its summed token loss divided by the trained tokens of the whole step, so every trained token
weighs the same however the tokens fall into micro-batches. Loss values leave the device only
at logging steps and checkpoints, so the loop does not wait on the GPU every step; the
non-finite guard (train/guard.py) decides on the device too.

The run can stop at any step boundary and continue exactly: checkpoints (train/checkpoint.py)
hold everything the next step depends on, and SIGINT/SIGTERM (train/stop.py) end the run with
one. A signal stop is not synchronised across processes: with several GPUs, stop them all.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm

from qlora_kit.config import TrainArguments
from qlora_kit.data.batches import collate, epoch_batches
from qlora_kit.errors import UserError
from qlora_kit.log import logger
from qlora_kit.train.checkpoint import (DataPosition, TrainState, best_checkpoint, checkpoints_dir, remove_leftovers,
                                        resume_training, rotate_checkpoints, save_checkpoint)
from qlora_kit.train.guard import NonfiniteGuard, nonfinite_stop_message, refuse_nonfinite_weights
from qlora_kit.train.loss import batch_loss_sum, check_chunked_loss, count_trained_tokens
from qlora_kit.train.metrics import MetricsLog
from qlora_kit.train.optim import build_optimizer, build_scheduler
from qlora_kit.train.stop import StopSignals, TrainingStopped


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step, and where the data stands after them."""

    micro_batches: list[dict[str, torch.Tensor]]
    position: DataPosition


def total_optimizer_steps(num_examples: int, args: TrainArguments) -> int:
    if args.max_steps > 0:
        return args.max_steps
    batches_per_epoch = math.ceil(num_examples / args.per_device_train_batch_size)
    return max(1, math.ceil(args.num_train_epochs * batches_per_epoch / args.gradient_accumulation_steps))


def step_batches(dataset: Dataset, args: TrainArguments, pad_id: int, start: DataPosition) -> Iterator[StepBatch]:
    """Endless optimizer steps of micro-batches, epoch after epoch, starting at `start`."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    epoch, index = start.epoch, start.batch_in_epoch
    batches = epoch_batches(lengths, args.per_device_train_batch_size, args.seed, epoch)
    while True:
        micro = []
        while len(micro) < args.gradient_accumulation_steps:
            if index == len(batches):
                epoch, index = epoch + 1, 0
                batches = epoch_batches(lengths, args.per_device_train_batch_size, args.seed, epoch)
            micro.append(collate([dataset[i] for i in batches[index]], pad_id))
            index += 1
        yield StepBatch(micro, DataPosition(epoch, index))


class LogWindow:
    """The loss of the applied steps since the last logged row, summed on the device."""

    def __init__(self, device: torch.device, saved: dict[str, Any]):
        self.loss_sum = torch.tensor(saved.get("loss_sum", 0.0), dtype=torch.float32, device=device)
        self.trained = torch.tensor(saved.get("trained_tokens", 0), dtype=torch.long, device=device)
        self.skipped_before = saved.get("skipped_before", 0)
        self.inputs, self.start = 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, trained_tokens: int, inputs: int, applied: torch.Tensor) -> None:
        self.loss_sum += torch.where(applied, loss_sum, 0.0)
        self.trained += applied.long() * trained_tokens
        self.inputs += inputs

    def close(self, skipped_total: int) -> dict[str, Any]:
        """The row's loss, throughput and skipped steps; the window starts again."""
        loss_sum, trained = torch.stack([self.loss_sum.double(), self.trained.double()]).tolist()
        row: dict[str, Any] = {"loss": loss_sum / trained} if trained else {}
        row["tokens_per_second"] = self.inputs / (time.perf_counter() - self.start)
        if skipped_total > self.skipped_before:
            row["skipped_steps"] = skipped_total - self.skipped_before
        self.loss_sum.zero_()
        self.trained.zero_()
        self.skipped_before, self.inputs, self.start = skipped_total, 0, time.perf_counter()
        return row

    def state_dict(self) -> dict[str, Any]:
        loss_sum, trained = torch.stack([self.loss_sum.double(), self.trained.double()]).tolist()
        return {"loss_sum": loss_sum, "trained_tokens": int(trained), "skipped_before": self.skipped_before}


@torch.no_grad()
def evaluate(model, dataset: Dataset, batch_size: int, pad_id: int, device: torch.device,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[float]:
    """Mean loss per trained token over a dataset; None when `should_stop` cut it short."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for start in range(0, len(dataset), batch_size):
        if should_stop is not None and should_stop():
            model.train()
            return None
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum += batch_loss_sum(model, batch)
        tokens += int(count_trained_tokens(batch["labels"]))
    model.train()
    return loss_sum.item() / max(tokens, 1)


def accumulate_step(model, micro_batches: list[dict], step_trained: int, accelerator: Accelerator) -> torch.Tensor:
    """Forward and backward of a step's micro-batches (gradients synchronised on the last); the summed token loss."""
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss_sum = batch_loss_sum(model, batch)
            accelerator.backward(loss_sum / max(step_trained, 1))
        step_loss += loss_sum.detach()
    return step_loss


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

    Raises:
        TrainingStopped: SIGINT/SIGTERM arrived; a checkpoint was written (exit code 128 + signal).
        UserError: a checkpoint could not be written, too many steps in a row were not finite, or the LoRA
            weights hold NaN or inf (they are never saved so).
    """
    device = accelerator.device
    total_steps = total_optimizer_steps(len(train_dataset), args)
    batches_per_epoch = max(1, math.ceil(len(train_dataset) / args.per_device_train_batch_size))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, args, device)
    scheduler = build_scheduler(optimizer, args, total_steps)
    guard = NonfiniteGuard(optimizer, args.max_nonfinite_steps, device)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    remove_leftovers(run_dir)
    state = TrainState()
    if resume_dir is not None:  # last before the first step: it restores the RNG states
        state = resume_training(resume_dir, run_dir, accelerator.unwrap_model(model), optimizer, scheduler, args)
        guard.load_state_dict(state.nonfinite)
    window = LogWindow(device, state.log_window)
    stop = StopSignals(newest_checkpoint=resume_dir)
    model.train()

    def checkpoint() -> Path:
        guard.read()  # sets bitsandbytes' step counts back before they are saved
        refuse_nonfinite_weights(accelerator.unwrap_model(model), f"training stopped at step {state.step}",
                                 stop.newest_checkpoint)
        state.nonfinite, state.log_window = guard.state_dict(), window.state_dict()
        path = checkpoints_dir(run_dir) / f"step-{state.step}"
        if accelerator.is_main_process:
            save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, state)
            rotate_checkpoints(run_dir, args.save_total_limit, args.keep_best_checkpoint)
        stop.newest_checkpoint = path
        return path

    batches = step_batches(train_dataset, args, pad_id, state.data)
    loss_checked = False
    with stop, tqdm(total=total_steps, initial=state.step, desc="training",
                    disable=not accelerator.is_main_process) as bar:
        while state.step < total_steps:
            step = next(batches)
            if not loss_checked:  # once per run: the chunked loss against the model's own
                check_chunked_loss(model, {k: v.to(device) for k, v in step.micro_batches[0].items()})
                loss_checked = True
            step_trained = int(sum(count_trained_tokens(b["labels"]) for b in step.micro_batches))
            step_inputs = int(sum(b["attention_mask"].sum() for b in step.micro_batches))
            if step_driver is not None:  # layer-major order: it runs forward and backward of the whole step
                step_loss = step_driver(step.micro_batches, step_trained).detach()
            else:
                step_loss = accumulate_step(model, step.micro_batches, step_trained, accelerator)
            grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
            # On the device: a non-finite step changes nothing.
            applied = guard.check(step_loss, grad_norm, scheduler.get_last_lr())
            prepared_optimizer.step()
            scheduler.step()
            prepared_optimizer.zero_grad(set_to_none=True)

            state.step += 1
            guard.after_step(state.step)
            state.data = step.position
            state.trained_tokens += step_trained
            state.tokens_seen += step_inputs
            window.add(step_loss, step_trained, step_inputs, applied)
            bar.update(1)

            at_end = state.step == total_steps
            if state.step % args.logging_steps == 0 or at_end:
                report = guard.read()
                row = {
                    "step": state.step,
                    **window.close(report.skipped),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "trained_tokens": state.trained_tokens,
                    "epoch": state.data.epoch + state.data.batch_in_epoch / batches_per_epoch,
                }
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}" if "loss" in row else "-", lr=f"{row['learning_rate']:.1e}",
                                tok_s=f"{row['tokens_per_second']:.0f}")
                if "skipped_steps" in row:
                    bar.write(f"step {state.step}: {row['skipped_steps']} step(s) with a non-finite loss or "
                              f"gradient norm skipped")

            state.eval_loss = None
            if eval_dataset is not None and ((args.eval_steps and state.step % args.eval_steps == 0) or at_end):
                state.eval_loss = evaluate(model, eval_dataset, args.per_device_eval_batch_size, pad_id, device,
                                           should_stop=lambda: stop.received is not None)
                if state.eval_loss is not None:
                    metrics.write({"step": state.step, "eval_loss": state.eval_loss})
                    bar.write(f"step {state.step}: eval loss {state.eval_loss:.4f}")

            saved = None
            if (args.save_steps and state.step % args.save_steps == 0) or at_end or stop.received:
                saved = checkpoint()
            if guard.tripped:
                saved = saved or checkpoint()
                raise UserError(nonfinite_stop_message(guard.last, args.max_nonfinite_steps, state.step, str(saved)))
            if stop.received and not at_end:
                bar.close()
                logger.warning(stop.stop_message(state.step, saved))
                raise TrainingStopped(stop.received, state.step, saved)

    if args.keep_best_checkpoint and (best := best_checkpoint(run_dir)):
        logger.info(f"best checkpoint: {best[0]} (eval loss {best[1]:.4f})")
    return state
