"""The run's output folder: refusing to clobber an earlier run, what a resume may change, and the final save.

RUN/ holds adapter_config.json + adapter_model.safetensors (PEFT format), the tokenizer and chat
template, run_config.yaml, metrics.jsonl, loss.png and checkpoints/step-N/.

A resume is checked against the run_config.yaml the checkpoint carries: what the checkpoint's
tensors and data position mean (the base model, the LoRA shape, the training tokens, the data
order) must not change; anything else may, and is listed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import pyarrow.compute as pc
import yaml
from datasets import Dataset

from qlora_kit.config import RunConfig, TrainArguments
from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.paths import check_output_parent
from qlora_kit.train.checkpoint import resolve_resume_dir
from qlora_kit.train.metrics import MetricsLog, plot_loss

RUN_MARKER = "run_config.yaml"

# Fields a resume must keep, and what they fix in the checkpoint.
FIXED_FIELDS = {
    "lora_r": "the LoRA shape",
    "lora_alpha": "the LoRA scale",
    "lora_target_modules": "the adapted modules",
    "use_rslora": "the LoRA scale",
    "use_dora": "the adapter layout",
    "seed": "the data order",
    "per_device_train_batch_size": "the data position, counted in batches",
    "optim": "the optimizer state's layout",
}
DATA_FIELDS = ("dataset_name", "dataset_format", "eval_dataset_name", "max_seq_length", "truncation_policy",
               "assistant_only_loss", "packing", "eval_fraction", "seed")
NOT_COMPARED = {"resume_from_checkpoint", "overwrite_output_dir", "resolved"}


def check_output_dir(run_dir: Path, args: TrainArguments) -> Optional[Path]:
    """Refuse an output folder that would lose work; return the checkpoint to resume from, if any.

    Nothing is written here: this runs before any file is touched. A checkpoint to resume from is
    validated against its manifest here.
    """
    if args.resume_from_checkpoint:
        return resolve_resume_dir(args.resume_from_checkpoint, run_dir)
    check_output_parent(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output_dir {run_dir} is a file; choose a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise UserError(f"--output_dir {run_dir} holds files that are not a qlora_kit run; choose another folder")
        if not args.overwrite_output_dir:
            raise UserError(
                f"--output_dir {run_dir} holds an earlier run; pass --overwrite_output_dir true to replace it, "
                f"--resume_from_checkpoint latest to continue it, or choose another folder"
            )
    return None


def model_fingerprint(model_dir: Path) -> str:
    """SHA-256 (16 hex digits) of the model's config.json, with the fields that name its location left out."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(dataset: Dataset, pad_id: int) -> str:
    """SHA-256 (16 hex digits) of the training tokens: every example's input_ids and labels, in order."""
    digest = hashlib.sha256(f"{len(dataset)} examples, pad {pad_id}".encode())
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        for column in ("input_ids", "labels"):
            digest.update(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).tobytes())
            digest.update(pc.list_flatten(table[column]).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def run_identity(model_dir: Path, train_dataset: Dataset, pad_id: int) -> dict[str, str]:
    """What a checkpoint's tensors depend on beyond the fields: the base model and the training tokens."""
    return {"model_fingerprint": model_fingerprint(model_dir), "data_fingerprint": data_fingerprint(train_dataset, pad_id)}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def resume_differences(saved: dict[str, Any], config: RunConfig, identity: dict[str, str]) -> tuple[list[str], list[str]]:
    """(refused, allowed): descriptions of what differs between a checkpoint's run_config.yaml and this run."""
    now = config.to_dict()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and k not in NOT_COMPARED and saved[k] != now[k]}
    shown = {k: f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changed.items()}
    refused, allowed = [], []
    resolved = saved.get("resolved") or {}
    if resolved.get("model_fingerprint") not in (None, identity["model_fingerprint"]):
        refused.append(f"the base model differs (config.json of {resolved.get('base_model_dir')} then, "
                       f"{now['model_name_or_path']} now)")
        shown.pop("model_name_or_path", None)
    data_differs = resolved.get("data_fingerprint") not in (None, identity["data_fingerprint"])
    if data_differs:
        causes = [shown.pop(k) for k in DATA_FIELDS if k in shown and k not in FIXED_FIELDS]
        why = ", ".join(causes) if causes else f"the contents of {now['dataset_name']} or the tokenizer changed"
        refused.append(f"the training tokens differ ({why})")
    for name, text in shown.items():
        if name in FIXED_FIELDS:
            refused.append(f"{text} ({FIXED_FIELDS[name]})")
        else:
            allowed.append(text)
    return refused, allowed


def check_resume(resume_dir: Path, config: RunConfig, identity: dict[str, str]) -> None:
    """Refuse to resume when the model, LoRA shape, data or data order differ from the checkpoint's run.

    Raises:
        UserError: listing every difference that cannot be resumed across.
    """
    saved_file = resume_dir / RUN_MARKER
    if not saved_file.is_file():
        notice_once(f"{resume_dir} carries no {RUN_MARKER}: only the adapter's tensor shapes can be checked")
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    refused, allowed = resume_differences(saved, config, identity)
    if refused:
        raise UserError(
            f"cannot resume from {resume_dir}: {'; '.join(refused)}. These must match the checkpoint: use the "
            f"checkpoint's values, or start a new run in another --output_dir"
        )
    if allowed:
        notice_once(f"resuming with changed fields: {', '.join(allowed)}")


def prepare_output_dir(run_dir: Path, resuming: bool) -> None:
    """Create the folder; clear an earlier run first when overwriting (checked by check_output_dir)."""
    if run_dir.is_dir() and not resuming and (run_dir / RUN_MARKER).is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def finish_run(run_dir: Path, model) -> None:
    """Save the final adapter (PEFT format) and draw loss.png from metrics.jsonl.

    The adapter is written to a hidden folder first and its files renamed into place, so a kill
    during the save leaves the previous files (or none), never a torn adapter_model.safetensors.
    """
    tmp = run_dir / ".tmp-final-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for file in sorted(tmp.iterdir()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: the previous files stay, the half-written ones go
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in sorted(tmp.iterdir()):
        os.replace(file, run_dir / file.name)
    tmp.rmdir()
    plot_loss(MetricsLog(run_dir / "metrics.jsonl").rows(), run_dir / "loss.png")
