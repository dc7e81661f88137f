"""The order of examples in each epoch, and padding a batch into tensors.

The batches of epoch e come from a generator seeded with (seed, e), so a resumed run finds the
same batches from the epoch and batch index alone. Batches are grouped by length: the shuffled
examples are cut into windows of `GROUP_WINDOW` batches, each window sorted by length, so a batch
holds examples of similar length and little padding; the batches are then shuffled again.
"""

from __future__ import annotations

import torch

from qlora_kit.data.tokenize import IGNORE_INDEX


GROUP_WINDOW = 50


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of every batch of an epoch, length-grouped and shuffled reproducibly."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = GROUP_WINDOW * batch_size
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad id), labels (-100) and attention_mask (0) to the longest example."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a batch that the model's forward takes (everything but the labels)."""
    return {key: value for key, value in batch.items() if key != "labels"}
