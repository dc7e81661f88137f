"""The causal-LM loss as a sum over trained tokens, chunked so the full logits never exist.

`batch_loss_sum(model, batch)` is the one place the training loop and the eval call the model.

The plain loss builds logits for every position: for Llama-3's 128,256-token vocabulary at 4,096
tokens that is 1 GB in bf16, 2.1 GB in fp32, and the log-softmax and its gradient add several more
copies. The chunked loss instead runs the decoder body (`get_decoder()` of the transformers model
under the peft wrapper) to get the final hidden states, keeps only the positions whose label is
not -100, and applies lm_head to `chunk_size` of them at a time. Each chunk runs under
non-reentrant activation checkpointing, so backward recomputes its logits: only one chunk of logits
is ever alive, in forward or backward. The cross-entropy is fp32 as in the plain loss, and what the
model's forward does to the logits after lm_head is replayed in its order and dtype, from the facts
of its family (qlora_kit/model/family.py): Gemma-2/3's final softcapping, Cohere's `logit_scale`,
Granite's `logits_scaling`.

Liger-Kernel's fused linear cross-entropy does the same in Triton, but it needs a GPU, covers a
fixed list of architectures, and would add a dependency; this version is plain PyTorch and runs on
CPU. A model of a family qlora_kit does not know keeps the plain loss, and says so once; the memory
plan is made for the plain loss then. Under DistributedDataParallel the model is called through
its wrapper, which synchronises the gradients (see `final_hidden_states`).

Facts written down can go stale when transformers rewrites a forward, so `check_chunked_loss`
compares the chunked loss with the model's own loss once, on the first micro-batch, and stops the
run on a mismatch rather than train on a wrong loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit.data.batches import attention_implementation, model_inputs
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.model.family import family_for, family_of, supported_names

LOSS_CHUNK_ATTRIBUTE = "qlora_kit_loss_chunk_size"
CHUNK_LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits per chunk, for the default chunk size
CHECK_TOKENS = 256                 # trained positions in the first-micro-batch check
CHECK_ATOL, CHECK_RTOL = 0.01, 0.01  # per-token loss: chunked vs the model's own, in nats


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per loss chunk: a power of two in [128, 8192] whose fp32 logits fit in 256 MiB."""
    tokens = max(1, CHUNK_LOGITS_BUDGET // (4 * vocab_size))
    return min(8192, max(128, 1 << (tokens.bit_length() - 1)))


def planned_chunk_size(model_type: str, vocab_size: int, requested: Optional[int]) -> int:
    """The chunk size a run of this model type will use: the request, else the default; 0 (the plain
    loss) for a model type of no known family, which `batch_loss_sum` computes with the plain loss."""
    if family_for(model_type) is None:
        if requested != 0:
            notice_once(f"model type {model_type!r} is not a known family: the memory plan is made for the plain loss "
                        f"over full logits, which it will train with")
        return 0
    return default_chunk_size(vocab_size) if requested is None else requested


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


@dataclass
class LogitHead:
    """How a causal LM turns final hidden states into logits: lm_head, then its own scaling."""

    lm_head: nn.Module
    multiply: Optional[float] = None   # Cohere: logits * logit_scale
    divide: Optional[float] = None     # Granite: logits / logits_scaling
    softcap: Optional[float] = None    # Gemma-2/3: cap * tanh(logits / cap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_head(model: nn.Module) -> Optional[LogitHead]:
    """The logit head of a transformers causal LM of a known family (qlora_kit/model/family.py), else None."""
    family = family_of(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if family is None or lm_head is None:
        return None
    return LogitHead(lm_head, **family.logit_steps(model.config))


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a DistributedDataParallel and a peft wrapper (its LoRA layers included)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_loss_chunk_size(model: nn.Module, chunk_size: int) -> None:
    """Make `batch_loss_sum` use this many tokens per chunk for this model (0: the plain loss)."""
    setattr(causal_lm(model), LOSS_CHUNK_ATTRIBUTE, chunk_size)


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: LogitHead) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: LogitHead, chunk_size: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of the final hidden states, `chunk_size` trained positions at a time.

    Args:
        hidden: final hidden states, batch x sequence x hidden.
        labels: the batch's labels; positions whose next label is -100 are dropped before lm_head.
        head: the model's logit head.
        chunk_size: trained positions per chunk.
    """
    targets = shifted_labels(labels)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    # Zero, but on the graph: a batch with no trained token (a data-parallel filler) still runs backward.
    total = hidden.sum(dtype=torch.float32) * 0.0
    for start in range(0, targets.numel(), chunk_size):
        chunk = (hidden[start:start + chunk_size], targets[start:start + chunk_size], head)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(*chunk)
    return total


def _chunk_size_for(model: nn.Module, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    base = causal_lm(model)
    chosen = getattr(base, LOSS_CHUNK_ATTRIBUTE, None)
    return default_chunk_size(base.config.vocab_size) if chosen is None else chosen


def _plain_reason(model: nn.Module) -> Optional[str]:
    """Why this model keeps the plain loss even with a chunk size set, or None when it can be chunked."""
    if logit_head(causal_lm(model)) is None:
        model_type = getattr(causal_lm(model).config, "model_type", "?")
        return f"model type {model_type!r} is not a known family (known: {supported_names()})"
    return None


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: Optional[int] = None) -> torch.Tensor:
    """Run the model on a batch and return its summed token loss.

    Args:
        model: the (peft-wrapped) causal LM.
        batch: input_ids, labels and the other inputs of `model_inputs`.
        chunk_size: trained tokens per loss chunk; 0 for the plain loss over full logits; None for the
            model's setting (`set_loss_chunk_size`), else a size chosen from the vocabulary.
    """
    chunk_size = _chunk_size_for(model, chunk_size)
    head = None
    if chunk_size > 0:
        reason = _plain_reason(model)
        if reason is not None:
            notice_once(f"plain loss over full logits, not the chunked loss: {reason}")
        else:
            head = logit_head(causal_lm(model))
    inputs = model_inputs(batch, attention_implementation(model))
    if head is None:
        return token_loss_sum(model(**inputs).logits, batch["labels"])
    hidden = final_hidden_states(model, inputs)
    return chunked_loss_sum(hidden.reshape(*batch["labels"].shape, -1), batch["labels"], head, chunk_size)


def final_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder body's output (after the final norm), without the logit head.

    Under DistributedDataParallel the forward must go through the wrapper, which prepares the
    gradient synchronisation, and under FSDP through the root module, which gathers the weights
    outside the decoder layers (embeddings, final norm, lm_head; the root keeps them gathered until
    backward, so the loss's use of lm_head finds them): the whole model runs with lm_head applied to
    no position (`logits_to_keep`, an empty index, a forward argument of every supported family),
    and a forward hook on the decoder body keeps its output.
    """
    from torch.distributed.fsdp import FSDPModule

    decoder = causal_lm(model).get_decoder()
    if not isinstance(model, (nn.parallel.DistributedDataParallel, FSDPModule)):
        return decoder(**inputs).last_hidden_state
    kept: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: kept.append(output.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        handle.remove()
    return kept[0]


def _check_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The row of the batch with the most trained tokens, up to CHECK_TOKENS past its first trained one."""
    trained = shifted_labels(batch["labels"]) != IGNORE_INDEX
    row = int(trained.sum(dim=1).argmax())
    first = int(trained[row].nonzero()[0]) if trained[row].any() else 0
    end = min(batch["labels"].shape[1], first + CHECK_TOKENS + 1)
    return {k: v[row:row + 1, :end] for k, v in batch.items()}


def check_chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Optional[tuple[float, float]]:
    """Check the chunked loss against the model's own loss (its forward with labels) on part of a batch.

    Run once, on the first micro-batch, in eval mode (no dropout), without gradients, on one row cut
    to CHECK_TOKENS trained positions so the model's full logits stay small. The two mean losses per
    trained token must agree within CHECK_ATOL + CHECK_RTOL x |own loss|.

    Returns:
        (chunked, own) mean losses; None when the chunked loss is not in use for this model.

    Raises:
        UserError: they disagree: this transformers version computes the family's logits in a way
            qlora_kit/model/family.py does not describe. Training stops rather than learn from a wrong loss.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # no gradients, so no synchronisation: each process checks its own batch
    chunk_size = _chunk_size_for(model, None)
    if chunk_size == 0 or _plain_reason(model) is not None:
        return None
    from torch.distributed.fsdp import FSDPModule

    part = _check_slice(batch)
    tokens = int(count_trained_tokens(part["labels"]))
    in_step = isinstance(model, FSDPModule)  # its forwards gather the weights of every process: all run them
    if tokens == 0 and not in_step:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunked_sum = float(batch_loss_sum(model, part, chunk_size))
            own = float(model(**model_inputs(part, attention_implementation(model)), labels=part["labels"]).loss)
    finally:
        model.train(was_training)
    if tokens == 0:
        return None
    chunked = chunked_sum / tokens
    if not abs(chunked - own) <= CHECK_ATOL + CHECK_RTOL * abs(own):
        family = family_of(causal_lm(model))
        raise UserError(f"the chunked loss of {family.name} ({chunked:.4f} per token) differs from the model's own "
                        f"loss ({own:.4f}) on the first micro-batch, beyond {CHECK_ATOL} + {CHECK_RTOL:.0%}: this "
                        f"transformers version changed the family's logit head; train with --loss_chunk_size 0")
    return chunked, own
