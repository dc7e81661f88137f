"""The data report: what the data stage read, kept, dropped (and why), and the token counts.

Every field is a plain number, string, list or mapping, so `vars(report)` goes into
run_config.yaml (`resolved.data`) as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class DataReport:
    """Counts of the training data (the sources of --dataset_name), before training starts."""

    examples_read: int = 0
    examples_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> records
    truncated: int = 0
    prefix_only: int = 0  # records far longer than max_seq_length, tokenized only up to a prefix (kept or dropped)
    context_replies: int = 0  # replies not trained: opening ones, or ones the template shows differently later
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    trained_share: float = 0.0
    length: dict[str, int] = field(default_factory=dict)  # min / median / p95 / max tokens per example
    sources: list[dict[str, Any]] = field(default_factory=list)  # per source: split, name, format, read, kept, ...
    packed_rows: Optional[int] = None
    packing_fill: Optional[float] = None  # share of the packed rows' tokens that are data, not padding
    tokenized_from_cache: bool = False

    def add_dropped(self, reasons: dict[str, int]) -> None:
        for reason, count in reasons.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)

    def set_training_counts(self, lengths: np.ndarray, trained: np.ndarray) -> None:
        """Tokens, trained tokens and the length distribution of the training examples."""
        self.train_examples = int(len(lengths))
        self.tokens = int(lengths.sum())
        self.trained_tokens = int(trained.sum())
        self.trained_share = round(self.trained_tokens / max(self.tokens, 1), 4)
        if len(lengths):
            self.length = {"min": int(lengths.min()), "median": int(np.median(lengths)),
                           "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())}

    def line(self) -> str:
        """The report as one log line."""
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])) or "none"
        parts = [
            f"data: {self.examples_read:,} examples read, {self.examples_kept:,} kept (dropped: {dropped}); "
            f"{self.truncated:,} truncated",
            f"{self.train_examples:,} for training, {self.eval_examples:,} for eval",
            f"{self.tokens:,} training tokens, {self.trained_tokens:,} trained ({100 * self.trained_share:.0f}%)",
        ]
        if self.length:
            parts.append("length min/median/p95/max " + "/".join(str(self.length[k]) for k in ("min", "median", "p95", "max")))
        if self.prefix_only:
            parts.append(f"{self.prefix_only:,} records far longer than max_seq_length tokenized only up to what "
                         "could be kept (the rest was never tokenized)")
        if self.context_replies:
            parts.append(f"{self.context_replies:,} replies kept as untrained context (an opening reply with nothing "
                         "before it, or one the chat template shows differently once later turns follow)")
        if self.packed_rows is not None:
            parts.append(f"packed into {self.packed_rows:,} rows ({100 * (self.packing_fill or 0):.0f}% filled)")
        if self.tokenized_from_cache:
            parts.append("tokenized data from the cache")
        return "; ".join(parts)
