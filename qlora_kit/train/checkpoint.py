"""Checkpoints: written atomically, validated, rotated, read back for an exact resume.

RUN/checkpoints/step-N/ holds the adapter (PEFT format), the optimizer state (bitsandbytes'
8-bit state included), the scheduler, every RNG state, trainer_state.json (step, data position,
counters, the loss-logging window, the non-finite guard), copies of metrics.jsonl and
run_config.yaml, and manifest.json: the size and SHA-256 of every other file. Tensors go to
safetensors, everything else to JSON: no pickle.

A checkpoint is written into a hidden temporary sibling, fsynced, and renamed into place
(`qlora_kit.io.atomic`), so a folder named step-N is always complete; a checkpoint is removed by
renaming it to a hidden name first. A process killed at any moment therefore leaves either the new
checkpoint or none, and the older ones untouched. Before a checkpoint is used, its manifest is checked.

transformers' Trainer checkpoints are not used: they pickle the optimizer and RNG states and
carry no manifest; accelerate's `save_state` pickles too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from qlora_kit.errors import UserError
from qlora_kit.io.atomic import TRASH, atomic_folder, remove_folder
from qlora_kit.log import logger, notice_once
from qlora_kit.train.state_io import RngState, load_optimizer, load_rng_state, save_optimizer, save_rng_state

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
COPIED_FILES = ("metrics.jsonl", "run_config.yaml")  # copied from the run folder into each checkpoint
TEST_BLOCK_ENV = "QLORA_KIT_TEST_BLOCK_IN_CHECKPOINT_WRITE"


@dataclass
class DataPosition:
    """Where the training data stands: the next micro-batch is batch `batch_in_epoch` of epoch `epoch`.

    The batches of an epoch are a pure function of (seed, epoch) (data.batches.epoch_batches), so
    these two numbers are the whole position. State of a packer joins here as further fields.
    """

    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class TrainState:
    """Where training stands: with the adapter, optimizer, scheduler and RNG, enough to continue exactly."""

    step: int = 0
    data: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    trained_tokens: int = 0
    eval_loss: Optional[float] = None  # the eval loss computed at `step`, if one was
    log_window: dict[str, Any] = field(default_factory=dict)  # the loss summed since the last logged row
    nonfinite: dict[str, Any] = field(default_factory=dict)  # the non-finite guard's counters

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        values = json.loads(text)
        return cls(**{**values, "data": DataPosition(**values["data"])})


class CheckpointDamaged(UserError):
    """A checkpoint folder whose files do not match its manifest."""


# ---------------------------------------------------------------- finding and validating checkpoints


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_step(folder: Path) -> int:
    match = STEP_DIR.match(folder.name)
    if not match:
        raise ValueError(f"{folder} is not a step-N folder")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run that carry a manifest (not yet validated), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_step)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def validate_checkpoint(folder: Path) -> None:
    """Check that every file the manifest lists is there, with its size and SHA-256.

    Raises:
        CheckpointDamaged: naming the first file that differs.
    """
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointDamaged(f"checkpoint {folder} has no readable {MANIFEST} ({error})") from None
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"checkpoint {folder} lacks {name}")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointDamaged(
                f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if file_digest(path) != expected["sha256"]:
            raise CheckpointDamaged(f"checkpoint {folder}: {name} does not match its SHA-256 in the manifest")


def resolve_resume_dir(choice: str, run_dir: Path) -> Path:
    """'latest' -> the newest checkpoint of run_dir that validates; otherwise the folder given, validated.

    A damaged newest checkpoint is reported and skipped for the one before it; it is not deleted.
    """
    if choice != "latest":
        path = Path(choice).expanduser()
        if not path.exists():
            raise UserError(f"--resume_from_checkpoint {choice} does not exist; {_available(path, run_dir)}")
        if not (path / MANIFEST).is_file():
            raise UserError(f"--resume_from_checkpoint {choice} is not a complete checkpoint folder (it has no "
                            f"{MANIFEST}); {_available(path, run_dir)}")
        validate_checkpoint(path)
        return path
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume_from_checkpoint latest: {checkpoints_dir(run_dir)} holds no complete checkpoint; "
                        f"start over with --overwrite_output_dir true, or choose another --output_dir")
    for folder in reversed(found):
        try:
            validate_checkpoint(folder)
            return folder
        except CheckpointDamaged as damage:
            logger.warning(f"{damage}; trying the checkpoint before it")
    raise UserError(f"--resume_from_checkpoint latest: every checkpoint in {checkpoints_dir(run_dir)} is damaged")


def _available(path: Path, run_dir: Path) -> str:
    """The complete checkpoints beside `path` and in run_dir, said for a message."""
    places = [run_dir] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
    found = sorted({str(c) for place in places for c in list_checkpoints(place)}, key=lambda c: checkpoint_step(Path(c)))
    if not found:
        return f"there is no complete checkpoint in {checkpoints_dir(run_dir)}"
    return f"the complete checkpoints are: {', '.join(found)} (or pass 'latest')"


# ---------------------------------------------------------------- writing


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: bytes and SHA-256 of every file in the folder, written last."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": file_digest(path)} for path in sorted(folder.iterdir())}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def remove_leftovers(run_dir: Path) -> None:
    """Delete hidden temporaries and half-deleted folders that a killed process left behind."""
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith((".tmp-", TRASH)):
                shutil.rmtree(path, ignore_errors=True)


def _block_here_for_tests(step: int, tmp: Path) -> None:
    """Test hook: with QLORA_KIT_TEST_BLOCK_IN_CHECKPOINT_WRITE=N, hang half-way through writing step N.

    Lets a test kill the process (SIGKILL) while a checkpoint is being written. Inert otherwise.
    """
    if os.environ.get(TEST_BLOCK_ENV) == str(step):
        (tmp / "test-blocked").touch()
        while True:
            time.sleep(1)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState,
                    rng_states: Optional[list[RngState]] = None, adapter: Optional[dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[dict] = None) -> Path:
    """Write checkpoints/step-N atomically and return its path.

    `rng_states`: the generator states of every process of a data-parallel run, by rank (else this one's).
    `adapter`, `optimizer_state`: a sharded run's LoRA weights and optimizer state, gathered whole
    (qlora_kit.model.shard), written instead of the model's and the optimizer's own.

    Raises:
        UserError: a write failed (disk full, quota, I/O error); the temporary folder is removed and
            the earlier checkpoints are as they were.
    """
    folder = checkpoints_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step}"
    try:
        with atomic_folder(final, folder / f".tmp-{final.name}") as tmp:
            model.save_pretrained(tmp, **({} if adapter is None else {"state_dict": adapter}))
            save_optimizer(optimizer, tmp, optimizer_state)
            _block_here_for_tests(state.step, tmp)
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            save_rng_state(tmp, rng_states)
            (tmp / STATE_FILE).write_text(state.to_json())
            for name in COPIED_FILES:
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, tmp / name)
            write_manifest(tmp, state.step)
    except (OSError, SafetensorError) as error:
        earlier = [p.name for p in list_checkpoints(run_dir)]
        kept = f"the earlier checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        raise UserError(
            f"could not write checkpoint {final}: {error}; training stopped and {kept}. Free disk space "
            f"(or choose another --output_dir), then run again with --resume_from_checkpoint latest"
        ) from None
    return final


def rotate_checkpoints(run_dir: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0: keep all) and, if asked, the best by eval loss."""
    found = list_checkpoints(run_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    keep = set(found[-keep_last:])
    if keep_best:
        scored = [(loss, p) for p in found if (loss := _eval_loss(p)) is not None]
        if scored:
            keep.add(min(scored, key=lambda item: item[0])[1])
    removed = [p for p in found if p not in keep]
    for folder in removed:
        remove_folder(folder)
    return removed


def _eval_loss(folder: Path) -> Optional[float]:
    try:
        return TrainState.from_json((folder / STATE_FILE).read_text()).eval_loss
    except (OSError, ValueError, TypeError, KeyError):
        return None


def best_checkpoint(run_dir: Path) -> Optional[tuple[Path, float]]:
    """The checkpoint with the lowest eval loss, and that loss, among those that have one."""
    scored = [(p, loss) for p in list_checkpoints(run_dir) if (loss := _eval_loss(p)) is not None]
    return min(scored, key=lambda item: item[1]) if scored else None


# ---------------------------------------------------------------- disk space


def checkpoint_bytes(model, optim: str) -> int:
    """The size of one checkpoint, from the trainable tensors and the optimizer's state layout.

    bitsandbytes' 8-bit optimizers keep two uint8 states plus a float32 absmax per 256 values for
    tensors of at least 4096 values, two float32 states below that; the 32-bit ones two float32
    states; torch's AdamW two states in the parameter's dtype. A few kB of JSON come on top.
    """
    total = 64 * 1024
    for parameter in (p for p in model.parameters() if p.requires_grad):
        n = parameter.numel()
        total += n * parameter.element_size()  # the adapter
        if optim.endswith("8bit") and n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
        elif optim == "adamw_torch":
            total += 2 * n * parameter.element_size() + 4
        else:
            total += 2 * 4 * n
    return total


def check_checkpoint_space(run_dir: Path, model, optim: str, copies: int = 2) -> None:
    """Refuse to start when the disk under run_dir cannot hold `copies` checkpoints."""
    need = copies * checkpoint_bytes(model, optim)
    existing = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(
            f"not enough disk space for checkpoints under {run_dir}: {copies} checkpoints need "
            f"{need / 2**20:,.1f} MiB but {free / 2**20:,.1f} MiB are free; free space or choose another --output_dir"
        )


# ---------------------------------------------------------------- reading back


def check_adapter_fits(folder: Path, model, adapter: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose adapter tensors are not the model's LoRA tensors, naming the difference."""
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    found = {name: tuple(t.shape) for name, t in adapter.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or unexpected or reshaped:
        example = (f"{reshaped[0]}: checkpoint {list(found[reshaped[0]])}, model {list(expected[reshaped[0]])}"
                   if reshaped else (missing or unexpected)[0])
        raise UserError(
            f"checkpoint {folder} does not fit this model's LoRA layers ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. {example}); "
            f"resume with the LoRA settings the checkpoint was trained with"
        )


def load_checkpoint(folder: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and process `rank`'s RNG from a validated checkpoint; return
    its TrainState.

    Call it last before the first step: the RNG states it restores are the ones the next step must see.
    """
    from qlora_kit.model.shard import is_sharded, load_trainable, saved_names, split_optimizer_state

    adapter = load_file(folder / "adapter_model.safetensors")
    check_adapter_fits(folder, model, adapter)
    sharded = is_sharded(model)
    if sharded:
        load_trainable(model, {model_name: adapter[saved_name] for saved_name, model_name in saved_names(model).items()})
    else:
        set_peft_model_state_dict(model, adapter)
    load_optimizer(optimizer, folder)
    if sharded:
        split_optimizer_state(optimizer)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    load_rng_state(folder, rank)
    return TrainState.from_json((folder / STATE_FILE).read_text())


def apply_current_settings(optimizer, scheduler, learning_rate: float, weight_decay: float) -> None:
    """After a resume, make this run's learning rate, weight decay and schedule the ones that apply.

    A restored optimizer carries the checkpoint's values; the scheduler was built from this run's
    fields (total steps included). With unchanged fields this writes back the very same numbers.
    """
    scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]
    for group, base_lr, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["weight_decay"] = weight_decay
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def restore_run_files(folder: Path, run_dir: Path) -> None:
    """Put the checkpoint's metrics.jsonl back into the run folder (rows after its step are dropped)."""
    source = folder / "metrics.jsonl"
    target = run_dir / "metrics.jsonl"
    if source.is_file():
        tmp = target.with_name(".metrics.jsonl.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    elif target.exists():
        target.unlink()


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than the one resumed from to superseded-step-N, so 'latest' never picks them."""
    moved = []
    for folder in list_checkpoints(run_dir):
        if checkpoint_step(folder) > step:
            target = folder.with_name(f"superseded-{folder.name}")
            suffix = 1
            while target.exists():
                suffix += 1
                target = folder.with_name(f"superseded-{folder.name}-{suffix}")
            os.replace(folder, target)
            moved.append(target)
    if moved:
        notice_once(f"resuming from step {step}: the later checkpoints of the earlier run were renamed to "
                    f"{', '.join(p.name for p in moved)}")
    return moved


def resume_training(folder: Path, run_dir: Path, model, optimizer, scheduler, args, accelerator=None) -> TrainState:
    """Continue from a validated checkpoint: later checkpoints set aside, metrics.jsonl put back, every state restored.

    `args` (TrainArguments) gives the learning rate and weight decay that apply from here on. With an
    `accelerator` of several processes, the first changes the run folder and each restores its own RNG.
    """
    step = TrainState.from_json((folder / STATE_FILE).read_text()).step
    if accelerator is None or accelerator.is_main_process:
        set_aside_later_checkpoints(run_dir, step)
        restore_run_files(folder, run_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    state = load_checkpoint(folder, model, optimizer, scheduler, accelerator.process_index if accelerator else 0)
    apply_current_settings(optimizer, scheduler, args.learning_rate, args.weight_decay)
    logger.info(f"resumed from {folder} at step {state.step}")
    return state
