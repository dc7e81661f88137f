"""The run's output folder: refusing to clobber an earlier run, and what is written at the end.

RUN/ holds adapter_config.json + adapter_model.safetensors (PEFT format), the tokenizer and chat
template, run_config.yaml, metrics.jsonl, loss.png and checkpoints/step-N/.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from qlora_kit.config import TrainArguments
from qlora_kit.errors import UserError
from qlora_kit.train.checkpoint import resolve_resume_dir
from qlora_kit.train.metrics import MetricsLog, plot_loss

RUN_MARKER = "run_config.yaml"


def check_output_dir(run_dir: Path, args: TrainArguments) -> Optional[Path]:
    """Refuse an output folder that would lose work; return the checkpoint to resume from, if any.

    Nothing is written here: this runs before any file is touched.
    """
    if args.resume_from_checkpoint:
        return resolve_resume_dir(args.resume_from_checkpoint, run_dir)
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


def prepare_output_dir(run_dir: Path, resuming: bool) -> None:
    """Create the folder; clear an earlier run first when overwriting (checked by check_output_dir)."""
    if run_dir.is_dir() and not resuming and (run_dir / RUN_MARKER).is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def finish_run(run_dir: Path, model) -> None:
    """Save the final adapter (PEFT format) and draw loss.png from metrics.jsonl."""
    model.save_pretrained(run_dir)
    plot_loss(MetricsLog(run_dir / "metrics.jsonl").rows(), run_dir / "loss.png")
