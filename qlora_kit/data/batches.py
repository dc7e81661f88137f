"""The order of examples in each epoch, padding a batch into tensors, and what the model is given.

The batches of epoch e come from a generator seeded with (seed, e), so a resumed run finds the
same batches from the epoch and batch index alone. With several processes (data parallel), a batch
holds the examples of all of them and `process_share` deals it out, so the batches, and the run,
are those of one process with a batch as large. Batches are grouped by length: the shuffled
examples are cut into windows of `GROUP_WINDOW` batches, each window sorted by length, so a batch
holds examples of similar length and little padding; the batches are then shuffled again.

Packed rows (see packing.py) carry `position_ids` that restart at 0 for every sequence.
`model_inputs` is the one place that decides what the model's forward receives. For packed rows it
passes the position ids and no attention mask, with the cache off: transformers' mask builder
(masking_utils, 5.x) then finds the sequences from the restarting positions and confines attention
to each (a block-diagonal causal mask for sdpa and eager, a block mask for flex, and sliding
windows per sequence), and its flash-attention path reads the same position ids as variable-length
sequences; flash attention only does so for a batch of one row, so for it the rows are laid end to
end. A 4D mask of our own would be used as it is and lose the models' sliding windows.
"""

from __future__ import annotations

from typing import Any

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


def process_share(batch: list[int], rank: int, num_processes: int) -> tuple[list[int], bool]:
    """This process's examples of a batch shared by `num_processes`, dealt out in turn.

    The batch is sorted by length (see `epoch_batches`), so dealing gives every process examples of
    similar length. A process left without one (the short last batch of an epoch) gets the batch's
    first example as a filler, marked True, to be trained on no token: every process must run a
    forward and backward for the gradients to be synchronised.
    """
    share = batch[rank::num_processes]
    return (share, False) if share else (batch[:1], True)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad id), labels (-100) and attention_mask (0) to the longest example.

    Packed rows also get `position_ids`; their padding counts from 0 as a sequence of its own.
    """
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    packed = "position_ids" in examples[0]
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
        if packed:
            position_ids[row, :n] = torch.tensor(example["position_ids"])
            position_ids[row, n:] = torch.arange(length - n)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def attention_implementation(model) -> str:
    """The attention kernel a model (or a wrapper of it: peft, DDP) runs: sdpa, eager, flash_attention_2, ..."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """The arguments of the model's forward for a batch (everything but the labels).

    Packed batches (with `position_ids`) get no attention mask and `use_cache=False`, so that
    transformers confines attention to each sequence; for flash attention the rows are laid end
    to end in one row, which leaves the logits in the same order as the labels when flattened.
    """
    inputs: dict[str, Any] = {key: value for key, value in batch.items() if key != "labels"}
    if "position_ids" not in batch:
        return inputs
    del inputs["attention_mask"]
    inputs["use_cache"] = False
    if "flash" in attn_implementation:
        inputs["input_ids"] = inputs["input_ids"].reshape(1, -1)
        inputs["position_ids"] = inputs["position_ids"].reshape(1, -1)
    return inputs
