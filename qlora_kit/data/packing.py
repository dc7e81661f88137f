"""Packing: several tokenized sequences per row of at most max_seq_length tokens, each seeing only itself.

Rows are filled best-fit decreasing (the longest sequence first, each into the row it fills most
tightly), which leaves little padding and is deterministic, so a resumed run finds the same rows.
A packed row keeps, per token, its position within its own sequence (`position_ids`, restarting
at 0); `batches.model_inputs` turns those into attention confined to each sequence. The first
label of every sequence is -100, so the last token of one sequence never learns to predict the
first token of the next: each sequence's loss is the one it has alone.

Written here because `datasets` has no packing and TRL's belongs to its own trainer; the rows
are built with Arrow and numpy in one pass, not a Python loop over tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.table import InMemoryTable

from qlora_kit.data.tokenize import IGNORE_INDEX


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the sequences in each row, best-fit decreasing; every row holds at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    rows: list[list[int]] = []
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"a sequence of {size} tokens cannot fit a row of {capacity}")
        slot = bisect_left(free, (size, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - size > 0:
            insort(free, (space - size, row))
    return rows


def column_numpy(dataset: Dataset, name: str) -> np.ndarray:
    """A number column of a dataset as an int64 array (through Arrow, not Python lists)."""
    return dataset.with_format("arrow")[name].to_numpy().astype(np.int64)


def _list_column(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    offsets_type = pa.int64() if offsets[-1] >= 2**31 else pa.int32()
    array_type = pa.LargeListArray if offsets_type == pa.int64() else pa.ListArray
    return array_type.from_arrays(pa.array(offsets, type=offsets_type), pa.array(values.astype(np.int32)))


def pack_dataset(dataset: Dataset, capacity: int) -> tuple[Dataset, float]:
    """Rows of packed sequences (input_ids, labels, position_ids) and the share of their tokens that is data.

    Args:
        dataset: tokenized examples with `input_ids`, `labels` and `length` columns.
        capacity: the most tokens a row holds (max_seq_length).
    """
    lengths = column_numpy(dataset, "length")
    rows = pack_rows(lengths.tolist(), capacity)
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    table = dataset.select(order).with_format("arrow")[:]
    ids = pc.list_flatten(table["input_ids"]).to_numpy()
    labels = pc.list_flatten(table["labels"]).to_numpy().copy()
    seq_lengths = lengths[order]
    seq_starts = np.cumsum(seq_lengths) - seq_lengths
    labels[seq_starts] = IGNORE_INDEX
    positions = np.arange(len(ids)) - np.repeat(seq_starts, seq_lengths)
    row_lengths = np.fromiter((lengths[row].sum() for row in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    packed = pa.table({"input_ids": _list_column(ids, offsets), "labels": _list_column(labels, offsets),
                       "position_ids": _list_column(positions, offsets)})
    fill = float(row_lengths.sum() / max(1, len(rows) * capacity))
    return Dataset(InMemoryTable(packed)), fill
