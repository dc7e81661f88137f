"""metrics.jsonl (one JSON object per logged step or eval) and the loss.png plot drawn from it."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends rows to RUN/metrics.jsonl, flushed at once so a crash keeps what was logged."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(rows: list[dict], path: Path) -> None:
    """Training loss (and eval loss, where logged) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
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
