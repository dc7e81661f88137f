"""The data stage: a dataset name in, tokenized train and eval splits and a report out."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset

from qlora_kit.config import DataArguments
from qlora_kit.data.formats import load_conversations
from qlora_kit.data.tokenize import IGNORE_INDEX, tokenize_conversation
from qlora_kit.errors import UserError


@dataclass
class DataReport:
    """What the data stage read, kept and dropped, in numbers."""

    examples_read: int = 0
    examples_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def line(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        share = 100 * self.trained_tokens / max(self.tokens, 1)
        return (f"data: {self.examples_read} conversations read, {self.examples_kept} kept "
                f"(dropped: {dropped}; truncated: {self.truncated}); {self.tokens:,} tokens, "
                f"{self.trained_tokens:,} trained ({share:.0f}%)")


def tokenize_dataset(conversations: list[list[dict]], tokenizer, args: DataArguments) -> tuple[Dataset, DataReport]:
    """Tokenize every conversation; drop those left with no trained token."""
    report = DataReport(examples_read=len(conversations))
    rows = []
    for messages in conversations:
        tokenized = tokenize_conversation(tokenizer, messages, args.max_seq_length, args.assistant_only_loss)
        trained = sum(label != IGNORE_INDEX for label in tokenized.labels)
        if trained == 0:
            report.dropped["with no trained token left after truncation"] = (
                report.dropped.get("with no trained token left after truncation", 0) + 1)
            continue
        report.truncated += tokenized.truncated
        report.tokens += len(tokenized.input_ids)
        report.trained_tokens += trained
        rows.append({"input_ids": tokenized.input_ids, "labels": tokenized.labels})
    report.examples_kept = len(rows)
    if not rows:
        raise UserError("the dataset is empty after tokenization: no conversation has an assistant token to train on")
    return Dataset.from_list(rows), report


def build_datasets(args: DataArguments, tokenizer, seed: int) -> tuple[Dataset, Dataset | None, DataReport]:
    """Train and eval splits of the tokenized data; the eval split is a seeded random fraction."""
    conversations = load_conversations(args.dataset_name)
    if not conversations:
        raise UserError(f"dataset {args.dataset_name} holds no conversations")
    dataset, report = tokenize_dataset(conversations, tokenizer, args)
    if args.eval_fraction == 0 or len(dataset) < 2:
        return dataset, None, report
    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)
    n_eval = max(1, round(args.eval_fraction * len(indices)))
    return dataset.select(sorted(indices[n_eval:])), dataset.select(sorted(indices[:n_eval])), report
