"""The causal-LM loss as a sum over trained tokens, chunked so the full logits never exist.

`batch_loss_sum(model, batch)` is the one place the training loop and the eval call the model.

The plain loss builds logits for every position: for Llama-3's 128,256-token vocabulary at 4,096
tokens that is 1 GB in bf16, 2.1 GB in fp32, and the log-softmax and its gradient add several more
copies. The chunked loss instead runs the decoder body (`get_decoder()` of the transformers model
under the peft wrapper) to get the final hidden states, keeps only the positions whose label is
not -100, and applies lm_head to `chunk_size` of them at a time. Each chunk runs under
non-reentrant activation checkpointing, so backward recomputes its logits: only one chunk of logits
is ever alive, in forward or backward. The cross-entropy is fp32 as in the plain loss, and the
model's own logit post-processing is replayed in the model's order and dtype: Gemma-2/3's final
softcapping, Cohere's `logit_scale` and Granite's `logits_scaling`.

Liger-Kernel's fused linear cross-entropy does the same in Triton, but it needs a GPU, covers a
fixed list of architectures, and would add a dependency; this version is plain PyTorch, runs on
CPU, and works for any decoder whose causal-LM head it can read (`logit_head`). A model whose
forward does something to the logits this module does not know (found by reading its source) keeps
the plain loss, and says so once. Under DistributedDataParallel the model is called through its
wrapper (DDP needs its own forward to synchronise gradients), so the plain loss is used there too.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit.data.batches import attention_implementation, model_inputs
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.log import notice_once

LOSS_CHUNK_ATTRIBUTE = "qlora_kit_loss_chunk_size"
CHUNK_LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits per chunk, for the default chunk size


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per loss chunk: a power of two in [128, 8192] whose fp32 logits fit in 256 MiB."""
    tokens = max(1, CHUNK_LOGITS_BUDGET // (4 * vocab_size))
    return min(8192, max(128, 1 << (tokens.bit_length() - 1)))


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


# Statements a causal-LM forward may hold between its decoder call and its loss, and what they mean.
_HEAD_STATEMENTS: list[tuple[str, Optional[str]]] = [
    (r"hidden_states = \w*outputs(\.last_hidden_state|\[0\])", None),
    (r"slice_indices = .*", None),
    (r"hidden_states = slice_logits_to_keep\(.*\)", None),
    (r"logits = self\.lm_head\(hidden_states(\[.*\])?\)", None),
    (r"if self\.config\.final_logit_softcapping is not None:", None),
    (r"logits = logits / self\.config\.final_logit_softcapping", "softcap"),
    (r"logits = torch\.tanh\(logits\)", None),
    (r"logits = logits \* self\.config\.final_logit_softcapping", None),
    (r"logits = logits \* self\.logit_scale", "multiply"),
    (r"logits = logits / self\.config\.logits_scaling", "divide"),
]


def _flatten(statements: list[ast.stmt]) -> list[str]:
    """Statements as normalised source lines; an `if` gives its test line and then its body."""
    lines = []
    for statement in statements:
        if isinstance(statement, ast.If) and not statement.orelse:
            lines.append(f"if {ast.unparse(statement.test)}:")
            lines += _flatten(statement.body)
        else:
            lines.append(ast.unparse(statement))
    return lines


@functools.lru_cache(maxsize=None)
def _head_statements(forward: Callable) -> Optional[tuple[str, ...]]:
    """The statements from the decoder's output to the loss in a causal-LM forward, or None if unreadable.

    Cached per forward function: `batch_loss_sum` asks on every micro-batch.
    """
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    lines = _flatten(getattr(function, "body", []))
    start = next((i for i, line in enumerate(lines) if re.match(r"hidden_states = \w*outputs", line)), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(("loss = ", "return "))), len(lines))
    return tuple(lines[start:end])  # immutable: the cache hands the same one to every caller


def logit_head(model: nn.Module) -> Optional[LogitHead]:
    """The logit head of a transformers causal LM, or None if its forward holds steps not known here."""
    statements = _head_statements(type(model).forward)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if statements is None or lm_head is None or not any("lm_head" in s for s in statements):
        return None
    head = LogitHead(lm_head)
    config = model.config
    for statement in statements:
        meaning = next((m for pattern, m in _HEAD_STATEMENTS if re.fullmatch(pattern, statement)), "unknown")
        if meaning == "unknown":
            return None
        if meaning == "softcap":
            head.softcap = config.final_logit_softcapping
        elif meaning == "multiply":
            head.multiply = float(model.logit_scale)
        elif meaning == "divide":
            head.divide = config.logits_scaling
    return head


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
    total = hidden.new_zeros((), dtype=torch.float32)
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
    if chunk_size > 0 and not isinstance(model, nn.parallel.DistributedDataParallel):
        head = logit_head(causal_lm(model))
        if head is None:
            notice_once(f"{type(causal_lm(model)).__name__} post-processes its logits in a way the chunked loss "
                        f"does not know: computing the plain loss over full logits")
    inputs = model_inputs(batch, attention_implementation(model))
    if head is None:
        return token_loss_sum(model(**inputs).logits, batch["labels"])
    hidden = causal_lm(model).get_decoder()(**inputs).last_hidden_state
    return chunked_loss_sum(hidden.reshape(*batch["labels"].shape, -1), batch["labels"], head, chunk_size)
