"""The run's output folder: refusing to clobber an earlier run, what a resume may change, and the final save.

RUN/ holds adapter_config.json + adapter_model.safetensors (PEFT format), the tokenizer and chat
template, run_config.yaml, metrics.jsonl, loss.png and checkpoints/step-N/ (and merged/ with
--export_merged; the trackers' folders and trackers.json with --report_to). These are the run's own files (RUN_FILES, RUN_FOLDERS); --overwrite_output_dir
removes only them, and never a file the run did not write (a user's notes, the run's own dataset).

A resume is checked against the run_config.yaml the checkpoint carries: what the checkpoint's
tensors and data position mean (the base model, the LoRA shape, the training tokens, the data
order) must not change; anything else may, and is listed once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow.compute as pc
import yaml
from datasets import Dataset

from qlora_kit.config import DataArguments, RunConfig, TrainArguments
from qlora_kit.data.load import parse_sources
from qlora_kit.errors import UserError
from qlora_kit.fingerprint import compare, model_fingerprint
from qlora_kit.io.atomic import fsync_dir, staged_folder
from qlora_kit.log import logger, notice_once
from qlora_kit.paths import RUN_MARKER, check_output_parent, check_writable
from qlora_kit.train.checkpoint import list_checkpoints, resolve_resume_dir
from qlora_kit.train.guard import refuse_nonfinite_weights
from qlora_kit.train.metrics import MetricsLog, plot_loss
from qlora_kit.train.trackers import IDS_FILE, TRACKER_FOLDERS

MODEL_CARD = "README.md"  # peft writes a model card with the adapter; the run's only when it is one
# The top-level files and folders a run writes, whichever tokenizer it has: what --overwrite_output_dir removes.
RUN_FILES = frozenset({
    RUN_MARKER, "metrics.jsonl", "loss.png", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", IDS_FILE,
})
RUN_FOLDERS = frozenset({"checkpoints", "merged", ".tmp-final-adapter", *TRACKER_FOLDERS})
RUN_PREFIXES = (".merged.partial-",)  # an export killed half-way (export/folder.py)

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

    Nothing is left behind here: this runs before the model loads and before any file is written
    (the write test's empty file is removed at once). A checkpoint to resume from is validated
    against its manifest here.
    """
    check_output_parent(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output_dir {run_dir} is a file; choose a folder")
    check_writable(run_dir)
    if args.resume_from_checkpoint:
        return resolve_resume_dir(args.resume_from_checkpoint, run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise UserError(f"--output_dir {run_dir} holds files that are not a qlora_kit run; choose another folder")
        if not args.overwrite_output_dir:
            raise UserError(f"--output_dir {run_dir} holds an earlier run; {_what_to_do_with(run_dir)}")
    return None


def _what_to_do_with(run_dir: Path) -> str:
    """The ways on from a folder holding an earlier run: resume only where a checkpoint exists."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        return (f"pass --overwrite_output_dir true to replace it, --resume_from_checkpoint latest to continue it "
                f"from {checkpoints[-1].name}, or choose another folder")
    return ("it has no checkpoint to resume from: pass --overwrite_output_dir true to start over (only the run's "
            "own files are removed), or choose another folder")


def data_fingerprint(dataset: Dataset, pad_id: int) -> str:
    """SHA-256 (16 hex digits) of the training tokens: every example's input_ids and labels, in order."""
    digest = hashlib.sha256(f"{len(dataset)} examples, pad {pad_id}".encode())
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        for column in ("input_ids", "labels"):
            digest.update(pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).tobytes())
            digest.update(pc.list_flatten(table[column]).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def run_identity(model_dir: Path, train_dataset: Dataset, pad_id: int, num_processes: int = 1) -> dict[str, Any]:
    """What a checkpoint's tensors depend on beyond the fields: the base model, the training tokens, and the
    number of data-parallel processes (the global batch, and the RNG states saved, one per process)."""
    return {"model_fingerprint": model_fingerprint(model_dir), "data_fingerprint": data_fingerprint(train_dataset, pad_id),
            "num_processes": num_processes}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _base_model_change(resolved: dict[str, Any], identity: dict[str, Any], model_now: str) -> Optional[str]:
    """Why the base model is not the checkpoint's, in words; None when it is (or cannot be told apart)."""
    recorded = resolved.get("model_fingerprint")
    found = compare(str(recorded), identity["model_fingerprint"]) if recorded else "same"
    if found == "config differs":
        return f"the base model differs (config.json of {resolved.get('base_model_dir')} then, {model_now} now)"
    if found == "weights differ":
        return (f"the base model differs (the weights of {model_now} are not those of "
                f"{resolved.get('base_model_dir')}, which the checkpoint was trained on)")
    return None


def resume_differences(saved: dict[str, Any], config: RunConfig, identity: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): descriptions of what differs between a checkpoint's run_config.yaml and this run."""
    now = config.to_dict()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and k not in NOT_COMPARED and saved[k] != now[k]}
    shown = {k: f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changed.items()}
    refused, allowed = [], []
    resolved = saved.get("resolved") or {}
    base_change = _base_model_change(resolved, identity, now["model_name_or_path"])
    if base_change:
        refused.append(base_change)
        shown.pop("model_name_or_path", None)
    processes_then, processes_now = resolved.get("num_processes", 1), identity.get("num_processes", 1)
    if processes_then != processes_now:
        refused.append(f"the number of processes {processes_then} -> {processes_now} (the global batch and each "
                       f"process's share of the data would differ; resume with {processes_then})")
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


def check_resume(resume_dir: Path, config: RunConfig, identity: dict[str, Any]) -> None:
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
    recorded = (saved.get("resolved") or {}).get("model_fingerprint")
    if not refused and recorded and compare(str(recorded), identity["model_fingerprint"]) == "weights unchecked":
        notice_once(f"{resume_dir} records the base model's config.json only (an older qlora_kit): its config "
                    f"matches, its weights cannot be checked; make sure {config.model.model_name_or_path} "
                    f"is the model the checkpoint was trained on")
    if refused:
        raise UserError(
            f"cannot resume from {resume_dir}: {'; '.join(refused)}. These must match the checkpoint: use the "
            f"checkpoint's values, or start a new run in another --output_dir"
        )
    if allowed:
        notice_once(f"resuming with changed fields: {', '.join(allowed)}")


def prepare_output_dir(run_dir: Path, resuming: bool, keep: Iterable[Path] = ()) -> None:
    """Create the folder; when overwriting (checked by check_output_dir), remove the earlier run's own files.

    Args:
        run_dir: the output folder.
        resuming: the run continues from a checkpoint: nothing is removed.
        keep: paths that must survive even where they bear a run file's name (the run's data sources).
    """
    if run_dir.is_dir() and not resuming and (run_dir / RUN_MARKER).is_file():
        remove_earlier_run(run_dir, keep)
    run_dir.mkdir(parents=True, exist_ok=True)


def data_paths(args: DataArguments) -> list[Path]:
    """The local files and folders the run reads its data from (they survive --overwrite_output_dir)."""
    specs = [args.dataset_name] + ([args.eval_dataset_name] if args.eval_dataset_name else [])
    names = [source.name for spec in specs for source in parse_sources(spec)]
    return [Path(name).expanduser() for name in names if Path(name).expanduser().exists()]


def is_run_entry(path: Path) -> bool:
    """Whether a top-level entry of a run folder is one a run writes (RUN_FILES, RUN_FOLDERS, peft's card)."""
    name = path.name
    if path.is_dir() and not path.is_symlink():
        return name in RUN_FOLDERS or name.startswith(RUN_PREFIXES)
    if name == MODEL_CARD:
        return is_peft_model_card(path)
    return name in RUN_FILES


def is_peft_model_card(path: Path) -> bool:
    """Whether README.md is the model card peft writes beside an adapter (and not a user's notes)."""
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    return head.startswith("---") and "library_name: peft" in head


def remove_earlier_run(run_dir: Path, keep: Iterable[Path] = ()) -> tuple[list[str], list[str]]:
    """Remove the run's own files from run_dir, leave every other file; log both lists.

    Returns:
        (removed, kept): the top-level names, folders with a trailing '/'.
    """
    protected = [Path(p).resolve() for p in keep]
    removed, kept = [], []
    for path in sorted(run_dir.iterdir()):
        shown = f"{path.name}/" if path.is_dir() else path.name
        resolved = path.resolve()
        holds_data = any(resolved == p or resolved in p.parents for p in protected)
        if not is_run_entry(path) or holds_data:
            kept.append(shown + (" (the run's data)" if holds_data else ""))
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(shown)
    logger.info(f"--overwrite_output_dir: removed the earlier run's files from {run_dir}: {', '.join(removed)}")
    if kept:
        logger.info(f"kept what the run did not write: {', '.join(kept)}")
    return removed, kept


def finish_run(run_dir: Path, model, adapter: Optional[dict] = None) -> None:
    """Save the final adapter (PEFT format) and draw loss.png from metrics.jsonl.

    `adapter`: a sharded run's LoRA weights gathered whole (qlora_kit.model.shard.trainable_tensors),
    written instead of the model's own.

    The adapter is written to a hidden folder first, synced, and its files renamed into place, so a
    kill during the save leaves the previous files (or none), never a torn adapter_model.safetensors.
    Weights holding NaN or inf are refused before anything is written.
    """
    checkpoints = list_checkpoints(run_dir)
    named = adapter if adapter is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    refuse_nonfinite_weights(named, "the final adapter was not written", checkpoints[-1] if checkpoints else None)
    # Ctrl-C, SIGTERM or a full disk while saving: the previous files stay, the half-written ones go.
    with staged_folder(run_dir / ".tmp-final-adapter") as tmp:
        model.save_pretrained(tmp, **({} if adapter is None else {"state_dict": adapter}))
    for file in sorted(tmp.iterdir()):
        target = run_dir / file.name
        if file.name == MODEL_CARD and target.exists() and not is_peft_model_card(target):
            notice_once(f"{target} is not peft's model card: it is left as it is, without the card")
            file.unlink()
            continue
        os.replace(file, target)
    tmp.rmdir()
    fsync_dir(run_dir)
    plot_loss(MetricsLog(run_dir / "metrics.jsonl").rows(), run_dir / "loss.png")
