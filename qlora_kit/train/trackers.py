"""Experiment trackers (--report_to): TensorBoard, Weights & Biases, MLflow and trackio through accelerate.

accelerate's tracker classes do the writing; this module chooses them, refuses a tracker whose
package is missing (before the model loads), and decides what they receive: every metrics.jsonl
row (training rows as train/*, eval rows as eval/*, sample replies as text beside their
repeated-n-gram rate), the resolved run_config.yaml flattened into hyper-parameters, and the data
report and memory plan as text.

A resumed run continues the same tracker run: TensorBoard writes to the same folder and drops
the events after the checkpoint's step (SummaryWriter's purge_step), W&B and MLflow reopen the
run whose id RUN/trackers.json keeps, trackio the run of the same name. Local trackers write
inside the run folder (RUN/tensorboard, RUN/wandb; MLflow's RUN/mlruns unless
MLFLOW_TRACKING_URI says otherwise); WANDB_MODE=offline keeps W&B off the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from qlora_kit.errors import UserError
from qlora_kit.log import logger, notice_once

# --report_to name -> (the module it needs, the pip package)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
IDS_FILE = "trackers.json"
TRACKER_FOLDERS = ("tensorboard", "wandb", "mlruns")  # what the local trackers write inside the run folder


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is not None


def check_report_to(value: str) -> list[str]:
    """The trackers --report_to names, each with its package installed.

    Args:
        value: none, all, or a comma-separated list of tracker names.

    Raises:
        UserError: an unknown name, or a named tracker whose package is missing (with the pip command).
    """
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        chosen = [name for name in TRACKER_PACKAGES if _installed(name)]
        notice_once(f"--report_to all: {', '.join(chosen) or 'no tracker package is installed, so none'} "
                    f"(of {', '.join(TRACKER_PACKAGES)})")
        return chosen
    unknown = [name for name in names if name not in TRACKER_PACKAGES]
    if unknown:
        raise UserError(f"--report_to: unknown tracker(s) {', '.join(unknown)}; choose none, all or a comma-separated "
                        f"list of {', '.join(TRACKER_PACKAGES)}")
    missing = [TRACKER_PACKAGES[name][1] for name in names if not _installed(name)]
    if missing:
        raise UserError(f"--report_to {value} needs {' and '.join(missing)}, which is not installed: "
                        f"pip install {' '.join(missing)}")
    return list(dict.fromkeys(names))


def read_ids(run_dir: Path) -> dict[str, str]:
    """The tracker run ids an earlier start of this run kept (RUN/trackers.json), or none."""
    path = run_dir / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def make_trackers(names: list[str], run_dir: Path, run_name: str, project: str, resume_step: Optional[int]) -> list:
    """accelerate tracker objects for `names`, set to continue the earlier tracker run when resuming.

    Args:
        names: tracker names from `check_report_to`.
        run_dir: the output folder; local trackers write inside it.
        run_name: the run's name in the trackers.
        project: the W&B / trackio project, the MLflow experiment.
        resume_step: the checkpoint step a resume starts from (None: a new run).
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    ids = read_ids(run_dir) if resume_step is not None else {}
    trackers = []
    for name in names:
        if name == "tensorboard":  # events land in RUN/tensorboard/<run_name>
            kwargs = {"purge_step": resume_step + 1} if resume_step is not None else {}
            trackers.append(TensorBoardTracker(run_name, run_dir / "tensorboard", **kwargs))
        elif name == "wandb":
            trackers.append(WandBTracker(project, name=run_name, id=ids.get("wandb") or secrets.token_hex(4),
                                         resume="allow", dir=str(run_dir)))
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").resolve().as_uri()
                logger.info(f"MLFLOW_TRACKING_URI is not set: MLflow writes to {run_dir / 'mlruns'}")
            trackers.append(MLflowTracker(project, run_id=ids.get("mlflow"), run_name=run_name))
        elif name == "trackio":
            trackers.append(TrackioTracker(project, name=run_name, resume="allow"))
    if resume_step is not None and trackers:
        logger.info(f"trackers ({', '.join(names)}) continue the earlier run from step {resume_step}")
    return trackers


def _run_ids(trackers: list) -> dict[str, str]:
    ids = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    return ids


def flat_config(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of 'a/b/c' keys with bool, int, float or str values (None dropped).

    Lists become JSON text, since trackers take only single values as hyper-parameters.
    """
    flat: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        elif value is not None:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def start_trackers(accelerator, run_dir: Path, project: str, texts: dict[str, str]) -> None:
    """Start the accelerator's trackers with the run config as hyper-parameters and `texts` at step 0.

    Args:
        accelerator: an Accelerator made with `log_with=make_trackers(...)`.
        run_dir: the output folder, holding run_config.yaml already.
        project: the project name accelerate passes to trackers it makes itself.
        texts: panel name -> text (the data report, the memory plan).
    """
    if not accelerator.log_with:
        return
    document = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    accelerator.init_trackers(project, config=flat_config(document))
    if accelerator.is_main_process:
        ids = _run_ids(accelerator.trackers)
        if ids:
            (run_dir / IDS_FILE).write_text(json.dumps(ids))
    accelerator.log(texts, step=0)
    logger.info(f"reporting to {', '.join(t.name for t in accelerator.trackers)}"
                + (f" (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})"
                   if any(t.name == "tensorboard" for t in accelerator.trackers) else ""))


def finish_trackers(accelerator) -> None:
    """Close the trackers' runs (flushing what they hold); a no-op without trackers."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def tracker_values(row: dict[str, Any]) -> dict[str, Any]:
    """What the trackers get for a metrics.jsonl row: train/* and eval/* numbers, or a sample reply's text."""
    if "reply" in row:
        index = row["sample"]
        return {f"samples/reply_{index}": f"**prompt:** {row['prompt']}\n\n**reply:** {row['reply']}",
                f"samples/repeated_ngram_rate_{index}": row["repeated_ngram_rate"]}
    values = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = value
    return values


def tracker_sink(accelerator) -> Optional[Callable[[dict[str, Any]], None]]:
    """A function that sends a metrics.jsonl row to the accelerator's trackers, or None without trackers."""
    if not accelerator.trackers:
        return None

    def send(row: dict[str, Any]) -> None:
        values = tracker_values(row)
        if values:
            accelerator.log(values, step=row["step"])

    return send
