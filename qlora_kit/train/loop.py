"""The training loop, on accelerate's `Accelerator` so that several GPUs run through `accelerate launch`.

One optimizer step takes `gradient_accumulation_steps` micro-batches. Each micro-batch's loss is
its summed token loss divided by the trained tokens of the whole step, so every trained token
weighs the same however the tokens fall into micro-batches. Loss values leave the device only
at logging steps and checkpoints, so the loop does not wait on the GPU every step; the
non-finite guard (train/guard.py) decides on the device too.

The run can stop at any step boundary and continue exactly: checkpoints (train/checkpoint.py)
hold everything the next step depends on, and SIGINT/SIGTERM (train/stop.py) end the run with
one.

Data parallel (`accelerate launch --num_processes N`): each process trains on its share of every
batch (data/batches.py), the step's trained tokens are counted over all of them, and one process
writes the metrics and the checkpoints: the run is that of one process with a batch N times as
large. A signal to any process stops them all after the same step (the processes compare notes
every step, the one wait on the device they add), with one checkpoint that holds every process's
RNG state. A process that dies makes the others stop at their next exchange with one line
(errors.LostProcess) naming the newest checkpoint, rather than a collective's traceback.

FSDP (a model sharded while loading, qlora_kit/model/shard.py): the same, except that the model is
not given to the accelerator (it is sharded already), every process runs the same number of
forwards at eval (a process short of eval batches runs one more and drops it, since each forward
gathers the layers from all processes), the LoRA weights and optimizer states are gathered whole
before a checkpoint is written, and every process generates the sample replies in step (each forward
gathers the layers from all of them), one writing them.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from datasets import Dataset
from tqdm.auto import tqdm

from qlora_kit.config import TrainArguments
from qlora_kit.data.batches import collate, epoch_batches, process_share
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.errors import LostProcess, UserError
from qlora_kit.log import logger
from qlora_kit.model.shard import is_sharded, optimizer_state, trainable_tensors
from qlora_kit.train.checkpoint import (DataPosition, TrainState, best_checkpoint, checkpoints_dir, remove_leftovers,
                                        resume_training, rotate_checkpoints, save_checkpoint)
from qlora_kit.train.guard import NonfiniteGuard, nonfinite_stop_message, refuse_nonfinite_weights
from qlora_kit.train.loss import batch_loss_sum, check_chunked_loss, count_trained_tokens
from qlora_kit.train.metrics import MetricsLog
from qlora_kit.train.optim import build_optimizer, build_scheduler
from qlora_kit.train.samples import SampleReplies
from qlora_kit.train.state_io import capture_rng_state
from qlora_kit.train.stop import StopSignals, TrainingStopped
from qlora_kit.train.trackers import tracker_sink


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step, and where the data stands after them."""

    micro_batches: list[dict[str, torch.Tensor]]
    position: DataPosition


def make_accelerator(cpu: Optional[bool] = None, log_with: Optional[list] = None) -> Accelerator:
    """The run's Accelerator; `cpu` defaults to "no CUDA here" (under `accelerate launch` the processes then
    train data parallel over gloo, not each alone). Under DDP each LoRA gradient is a view into DDP's
    all-reduce bucket (`gradient_as_bucket_view`), so the buckets add no second copy of the gradients to what
    one GPU holds."""
    return Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu,
                       log_with=log_with or None,  # [] would warn of no trackers
                       kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])


def batches_per_epoch(num_examples: int, args: TrainArguments, num_processes: int = 1) -> int:
    """Micro-batches of all processes together in one epoch: the global batch is per-device x processes."""
    return max(1, math.ceil(num_examples / (args.per_device_train_batch_size * num_processes)))


def total_optimizer_steps(num_examples: int, args: TrainArguments, num_processes: int = 1) -> int:
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = batches_per_epoch(num_examples, args, num_processes)
    return max(1, math.ceil(args.num_train_epochs * per_epoch / args.gradient_accumulation_steps))


def step_batches(dataset: Dataset, args: TrainArguments, pad_id: int, start: DataPosition, rank: int = 0,
                 num_processes: int = 1) -> Iterator[StepBatch]:
    """Endless optimizer steps of this process's micro-batches, epoch after epoch, starting at `start`.

    Every process walks the same global batches (per-device x processes examples) and takes its share.
    """
    lengths = [len(ids) for ids in dataset["input_ids"]]
    size = args.per_device_train_batch_size * num_processes
    epoch, index = start.epoch, start.batch_in_epoch
    batches = epoch_batches(lengths, size, args.seed, epoch)
    while True:
        micro = []
        while len(micro) < args.gradient_accumulation_steps:
            if index == len(batches):
                epoch, index = epoch + 1, 0
                batches = epoch_batches(lengths, size, args.seed, epoch)
            share, filler = process_share(batches[index], rank, num_processes)
            batch = collate([dataset[i] for i in share], pad_id)
            if filler:
                batch["labels"].fill_(IGNORE_INDEX)
            micro.append(batch)
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
             should_stop: Optional[Callable[[], bool]] = None, accelerator: Optional[Accelerator] = None
             ) -> Optional[float]:
    """Mean loss per trained token over a dataset; None when `should_stop` cut it short.

    With an `accelerator` of several processes each evaluates its share of the batches and the sums
    are added up across them (`should_stop` is then not consulted: all must reach the sum).
    """
    rank, num_processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if num_processes > 1:
        should_stop = None
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, trained tokens
    starts = list(range(rank * batch_size, len(dataset), batch_size * num_processes))
    rounds = math.ceil(math.ceil(len(dataset) / batch_size) / num_processes) if is_sharded(model) else len(starts)
    for index in range(rounds):
        if should_stop is not None and should_stop():
            model.train()
            return None
        start = starts[index] if index < len(starts) else 0  # past its share: a forward in step with the others
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum = batch_loss_sum(model, batch).double()
        if index < len(starts):
            sums[0] += loss_sum
            sums[1] += count_trained_tokens(batch["labels"])
    model.train()
    if num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss_sum, tokens = sums.tolist()
    return loss_sum / max(tokens, 1)


def accumulate_step(model, micro_batches: list[dict], step_trained: int, accelerator: Accelerator) -> torch.Tensor:
    """Forward and backward of a step's micro-batches (gradients synchronised on the last); this process's
    summed token loss.

    `step_trained` counts the trained tokens of every process. Data parallel averages the gradients
    of the processes, so each scales its loss by their number: every token weighs 1 / step_trained.
    """
    step_loss = torch.zeros((), device=accelerator.device)
    divisor = max(step_trained, 1) / accelerator.num_processes
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss_sum = batch_loss_sum(model, batch)
            accelerator.backward(loss_sum / divisor)
        step_loss += loss_sum.detach()
    return step_loss


def all_processes_sum(accelerator: Accelerator, *values: torch.Tensor | int) -> list[torch.Tensor]:
    """Each value summed over the processes (as it is with one)."""
    if accelerator.num_processes == 1:
        return [torch.as_tensor(value) for value in values]
    stacked = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=accelerator.device) for value in values])
    return list(accelerator.reduce(stacked, reduction="sum"))


def signal_of_any_process(accelerator: Accelerator, received: Optional[int]) -> Optional[int]:
    """The stop signal any process has received (None: none has), so that all stop after the same step."""
    flags = accelerator.gather(torch.tensor([received or 0], device=accelerator.device))
    return int(flags.max()) or None


def another_process_died(error: BaseException) -> bool:
    """Whether a collective failed because a peer process is gone: torch's distributed errors, or gloo's TCP
    transport, which raises a plain RuntimeError naming itself ("gloo/transport ... Connection reset by peer")."""
    return isinstance(error, torch.distributed.DistError) or "gloo/transport" in str(error)


@contextmanager
def lost_process_stops(accelerator: Accelerator, state: TrainState, stop: StopSignals) -> Iterator[None]:
    """Turn the failed collective of a process whose peer died into a `LostProcess` naming what to resume."""
    try:
        yield
    except RuntimeError as error:
        if accelerator.num_processes == 1 or not another_process_died(error):
            raise
        newest = stop.newest_checkpoint
        resume = (f"The newest checkpoint is {newest}: resume with --resume_from_checkpoint {newest}." if newest
                  else "No checkpoint was written yet.")
        raise LostProcess(f"process {accelerator.process_index} of {accelerator.num_processes}: another process of "
                          f"this run died after step {state.step} (its own error is above); stopping too. "
                          f"{resume}") from None


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
    samples: Optional[SampleReplies] = None,
) -> TrainState:
    """Train the LoRA parameters of `model`; save checkpoints and log metrics in run_dir.

    `step_driver(micro_batches, step_trained)`, when given, runs a step's forward and backward
    itself and returns its summed token loss (qlora_kit.memory.reorder: layer-major order).
    `samples`, when given, writes greedy sample replies to metrics.jsonl at each eval.
    Every metrics.jsonl row also goes to the accelerator's trackers (train/trackers.py).

    Raises:
        TrainingStopped: SIGINT/SIGTERM arrived; a checkpoint was written (exit code 128 + signal).
        LostProcess: another process of the run died.
        UserError: a checkpoint could not be written, too many steps in a row were not finite, or the LoRA
            weights hold NaN or inf (they are never saved so).
    """
    device = accelerator.device
    total_steps = total_optimizer_steps(len(train_dataset), args, accelerator.num_processes)
    per_epoch = batches_per_epoch(len(train_dataset), args, accelerator.num_processes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, args, device)
    scheduler = build_scheduler(optimizer, args, total_steps)
    guard = NonfiniteGuard(optimizer, args.max_nonfinite_steps, device)
    metrics = MetricsLog(run_dir / "metrics.jsonl", on_row=tracker_sink(accelerator))
    sharded = is_sharded(model)
    if sharded:  # FSDP already holds it; data parallel would wrap it again
        prepared_optimizer = accelerator.prepare(optimizer)
    else:
        model, prepared_optimizer = accelerator.prepare(model, optimizer)
    remove_leftovers(run_dir)
    state = TrainState()
    if resume_dir is not None:  # last before the first step: it restores the RNG states
        state = resume_training(resume_dir, run_dir, accelerator.unwrap_model(model), optimizer, scheduler, args,
                                accelerator)
        guard.load_state_dict(state.nonfinite)
    window = LogWindow(device, state.log_window)
    stop = StopSignals(newest_checkpoint=resume_dir)
    model.train()

    def checkpoint() -> Path:
        guard.read()  # sets bitsandbytes' step counts back before they are saved
        unwrapped = accelerator.unwrap_model(model)
        adapter = trainable_tensors(unwrapped)  # every process: a sharded model's are gathered
        refuse_nonfinite_weights(adapter, f"training stopped at step {state.step}", stop.newest_checkpoint)
        gathered = (adapter, optimizer_state(optimizer, unwrapped)) if sharded else (None, None)
        state.nonfinite, state.log_window = guard.state_dict(), window.state_dict()
        path = checkpoints_dir(run_dir) / f"step-{state.step}"
        rng_states = gather_object([capture_rng_state()]) if accelerator.num_processes > 1 else None
        if accelerator.is_main_process:
            save_checkpoint(run_dir, unwrapped, optimizer, scheduler, state, rng_states, *gathered)
            rotate_checkpoints(run_dir, args.save_total_limit, args.keep_best_checkpoint)
        accelerator.wait_for_everyone()
        stop.newest_checkpoint = path
        return path

    def log_row(row: dict[str, Any]) -> None:  # one process writes the run's metrics
        if accelerator.is_main_process:
            metrics.write(row)

    batches = step_batches(train_dataset, args, pad_id, state.data, accelerator.process_index, accelerator.num_processes)
    loss_checked = False
    with stop, lost_process_stops(accelerator, state, stop), tqdm(
            total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process) as bar:
        def tell(text: str) -> None:  # tqdm's write prints even from a disabled bar: one process speaks
            if accelerator.is_main_process:
                bar.write(text)

        while state.step < total_steps:
            step = next(batches)
            if not loss_checked:  # once per run: the chunked loss against the model's own
                check_chunked_loss(model, {k: v.to(device) for k, v in step.micro_batches[0].items()})
                loss_checked = True
            step_trained, step_inputs = (int(n) for n in all_processes_sum(
                accelerator, sum(count_trained_tokens(b["labels"]) for b in step.micro_batches),
                sum(b["attention_mask"].sum() for b in step.micro_batches)))
            if step_driver is not None:  # layer-major order: it runs forward and backward of the whole step
                step_loss = step_driver(step.micro_batches, step_trained).detach()
            else:
                step_loss = accumulate_step(model, step.micro_batches, step_trained, accelerator)
            if accelerator.num_processes > 1:
                step_loss = accelerator.reduce(step_loss, reduction="sum")
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
                    "epoch": state.data.epoch + state.data.batch_in_epoch / per_epoch,
                }
                log_row(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}" if "loss" in row else "-", lr=f"{row['learning_rate']:.1e}",
                                tok_s=f"{row['tokens_per_second']:.0f}")
                if "skipped_steps" in row:
                    tell(f"step {state.step}: {row['skipped_steps']} step(s) with a non-finite loss or "
                         f"gradient norm skipped")

            at_eval = bool(args.eval_steps and state.step % args.eval_steps == 0) or at_end
            state.eval_loss = None
            if eval_dataset is not None and at_eval:
                state.eval_loss = evaluate(model, eval_dataset, args.per_device_eval_batch_size, pad_id, device,
                                           should_stop=lambda: stop.received is not None, accelerator=accelerator)
                if state.eval_loss is not None:
                    log_row({"step": state.step, "eval_loss": state.eval_loss})
                    tell(f"step {state.step}: eval loss {state.eval_loss:.4f}")
            if accelerator.num_processes > 1:
                stop.received = signal_of_any_process(accelerator, stop.received)
            if samples is not None and at_eval and stop.received is None and (sharded or accelerator.is_main_process):
                rows = samples.rows(accelerator.unwrap_model(model), state.step, in_step=sharded)
                if accelerator.is_main_process:
                    for row in rows:
                        metrics.write(row)
                tell(samples.summary(rows))

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
