"""The causal-LM loss as a sum over trained tokens, so micro-batches can be weighted by token count.

`batch_loss_sum(model, batch)` is the one place the training loop and the eval call the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_kit.data.batches import attention_implementation, model_inputs
from qlora_kit.data.tokenize import IGNORE_INDEX


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts label t+1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (shifted_labels(labels) != IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the fp32 cross-entropy over positions whose shifted label is not -100."""
    targets = shifted_labels(labels).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum",
                           ignore_index=IGNORE_INDEX)


def batch_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the model on a batch and return its summed token loss."""
    logits = model(**model_inputs(batch, attention_implementation(model))).logits
    return token_loss_sum(logits, batch["labels"])
