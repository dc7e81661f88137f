"""metrics.jsonl (one JSON object per logged step or eval) and the loss.png plot drawn from it.

Every line is valid JSON: a NaN or inf value (a loss that blew up) is written as null, since JSON
has no such numbers and Python's `NaN`/`Infinity` spellings break other readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional


def json_safe(value: Any) -> Any:
    """`value` with every NaN or inf float, at any depth of dicts and lists, turned into None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class MetricsLog:
    """Appends rows to RUN/metrics.jsonl, flushed at once so a crash keeps what was logged.

    Non-finite numbers are written as null (see the module docstring). `on_row`, when given,
    receives every row as written (the experiment trackers).
    """

    def __init__(self, path: Path, on_row: Optional[Callable[[dict], None]] = None):
        self.path = path
        self.on_row = on_row

    def write(self, row: dict) -> None:
        row = json_safe(row)
        with self.path.open("a") as file:
            file.write(json.dumps(row, allow_nan=False) + "\n")
        if self.on_row is not None:
            self.on_row(row)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(rows: list[dict], path: Path) -> None:
    """Training and eval loss against the optimizer step, the learning rate on a second axis, skipped steps marked.

    A row with skipped steps (a non-finite loss or gradient norm) gets a red dashed line at its step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    rates = [(r["step"], r["learning_rate"]) for r in rows if r.get("learning_rate") is not None]
    skipped = [r["step"] for r in rows if r.get("skipped_steps")]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    for number, step in enumerate(skipped):
        axes.axvline(step, color="tab:red", linestyle="--", alpha=0.6,
                     label="steps skipped (non-finite)" if number == 0 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per trained token")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if rates:
        lr_axes = axes.twinx()
        lr_axes.plot(*zip(*rates), color="tab:gray", linewidth=1, label="learning rate")
        lr_axes.set_ylabel("learning rate")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = lr_axes.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        axes.legend(handles, labels, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
