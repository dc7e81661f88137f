"""--preview_data: what the run trains on, shown before any model is loaded.

The examples are the training split exactly as the data stage built it (packed rows split back
into their sequences by their restarting position ids), decoded with the special tokens left
visible. A token is marked when it is a training target: its label is not -100 and
it is not a sequence's first token (position t's logits predict label t, from the token before).
On a terminal the marked text is green; elsewhere it is wrapped in [[ ]]. With --packing one
packed row's sequence boundaries are listed too. --preview_data_file writes the same as HTML.
"""

from __future__ import annotations

import html
import sys
from itertools import groupby
from pathlib import Path
from typing import Optional

from datasets import Dataset

from qlora_kit.data.report import DataReport
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.errors import UserError

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\033[32m", "\033[0m"


def trained_mask(labels: list[int]) -> list[bool]:
    """Per token, whether the run trains on it (a label other than -100, after the first position)."""
    return [t > 0 and label != IGNORE_INDEX for t, label in enumerate(labels)]


def sequences(train_data: Dataset, count: int) -> list[tuple[list[int], list[int]]]:
    """The first `count` training sequences as (input_ids, labels); packed rows are split at their boundaries."""
    found: list[tuple[list[int], list[int]]] = []
    for row in train_data:
        if len(found) >= count:
            break
        bounds = boundaries(row.get("position_ids")) if "position_ids" in row else [(0, len(row["input_ids"]))]
        found += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in bounds]
    return found[:count]


def boundaries(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each sequence of a packed row, from where its position ids restart at 0."""
    starts = [t for t, position in enumerate(position_ids) if position == 0] or [0]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The sequence as runs of (text, trained): each run of trained or untrained tokens decoded, special tokens kept."""
    pairs = list(zip(ids, trained_mask(labels)))
    return [(tokenizer.decode([token for token, _ in run], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False), trained)
            for trained, run in ((key, list(group)) for key, group in groupby(pairs, key=lambda pair: pair[1]))]


def as_text(runs: list[tuple[str, bool]], colour: bool) -> str:
    """Runs as plain text: trained text green (colour) or between [[ and ]]."""
    before, after = (GREEN, RESET) if colour else (OPEN, CLOSE)
    return "".join(f"{before}{text}{after}" if trained else text for text, trained in runs)


def as_html(runs: list[tuple[str, bool]]) -> str:
    return "".join(f'<span class="trained">{html.escape(text)}</span>' if trained else html.escape(text)
                   for text, trained in runs)


def packed_row_line(train_data: Dataset) -> Optional[str]:
    """The sequence boundaries of the first packed row holding several sequences (else row 0), or None unpacked."""
    if "position_ids" not in train_data.column_names or not len(train_data):
        return None
    number, bounds = 0, boundaries(train_data[0]["position_ids"])
    for index in range(len(train_data)):  # row by row: the first such row is usually near the start
        positions = train_data[index]["position_ids"]
        if positions.count(0) > 1:
            number, bounds = index, boundaries(positions)
            break
    spans = ", ".join(f"{a}-{b - 1}" for a, b in bounds)
    return f"packed row {number}: {len(bounds)} sequences in {bounds[-1][1]} tokens, at tokens {spans}"


def preview(tokenizer, train_data: Dataset, report: DataReport, count: int, colour: Optional[bool] = None,
            html_file: Optional[str] = None) -> str:
    """The preview text (data report, marked examples, a packed row's boundaries); also written as HTML if asked.

    Args:
        tokenizer: the run's tokenizer.
        train_data: the training split as `build_datasets` returns it.
        report: its data report.
        count: how many examples to show.
        colour: mark with colour (default: when stdout is a terminal).
        html_file: also write the preview to this HTML file.
    """
    colour = sys.stdout.isatty() if colour is None else colour
    examples = [segments(tokenizer, ids, labels) for ids, labels in sequences(train_data, count)]
    legend = "trained tokens in green" if colour else f"trained tokens between {OPEN} and {CLOSE}"
    packed = (packed_row_line(train_data)
              or "packing is off: every example is a row of its own (--packing true packs them)")
    parts = [report.line(), f"{len(examples)} training example(s), {legend}; special tokens shown as they are:"]
    for number, runs in enumerate(examples, 1):
        parts.append(f"--- example {number} ---\n{as_text(runs, colour)}")
    parts.append(packed)
    if html_file:
        write_html(Path(html_file), report.line(), examples, packed)
    return "\n".join(parts)


def write_html(path: Path, report_line: str, examples: list[list[tuple[str, bool]]], packed: str) -> None:
    """The preview as a standalone HTML page (trained tokens highlighted)."""
    if not path.parent.is_dir():
        raise UserError(f"--preview_data_file {path}: the folder {path.parent} does not exist")
    body = "\n".join(f"<h3>example {n}</h3><pre>{as_html(runs)}</pre>" for n, runs in enumerate(examples, 1))
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>qlora_kit data preview</title>"
        "<style>body{font-family:sans-serif}pre{white-space:pre-wrap;background:#f6f6f6;padding:8px}"
        ".trained{background:#c8f7c5}</style>"
        f"<p>{html.escape(report_line)}</p><p>Trained tokens are highlighted.</p>{body}"
        f"<p>{html.escape(packed)}</p>\n")
