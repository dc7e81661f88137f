"""metrics.jsonl (one JSON object per logged step or eval) and the loss.png plot drawn from it.

Every line is valid JSON: a NaN or inf value (a loss that blew up) is written as null, since JSON
has no such numbers and Python's `NaN`/`Infinity` spellings break other readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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

    Non-finite numbers are written as null (see the module docstring).
    """

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(rows: list[dict], path: Path) -> None:
    """Training loss (and eval loss, where logged) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per trained token")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
