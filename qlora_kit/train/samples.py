"""Sample replies during training: greedy answers to a few prompts at each eval, with a repeated-n-gram rate.

A loss curve does not show a model that has started to repeat itself; the replies and their
repeated-n-gram rate (the share of the reply's token n-grams that already occurred earlier in it:
0 for a reply without repeats, near 1 for a loop) do. The prompts come from --eval_prompts (a
.jsonl file of {"prompt": text} or {"messages": [...]} records, a trailing assistant turn dropped),
or else from the eval conversations: each one's tokens up to its first trained reply, which is
the chat template's generation prompt exactly as the run saw it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset

from qlora_kit.data.formats import SkipRecord
from qlora_kit.data.prompts import json_lines, prompt_messages
from qlora_kit.data.tokenize import IGNORE_INDEX, ensure_chat_template, render
from qlora_kit.errors import UserError

NGRAM = 3
PROMPT_SHOWN_CHARS = 200  # the end of a long prompt is what the reply answers


def repeated_ngram_rate(tokens: list[int], n: int = NGRAM) -> float:
    """Share of the n-grams of `tokens` that repeat an earlier n-gram of it (0 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def prompts_from_eval(eval_data: Dataset, count: int) -> list[list[int]]:
    """The first `count` eval conversations' tokens up to their first trained reply."""
    prompts = []
    for example in eval_data.select(range(min(count, len(eval_data)))):
        labels = example["labels"]
        first = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), None)
        if first:
            prompts.append(list(example["input_ids"][:first]))
    return prompts


def prompts_from_file(path: str, tokenizer, count: int) -> list[list[int]]:
    """Token ids of the first `count` prompts of a .jsonl file, rendered by the chat template for a reply."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--eval_prompts {path} does not exist; give a .jsonl file of {{\"prompt\": text}} records")
    ensure_chat_template(tokenizer)
    prompts = []
    for number, record in json_lines(file, f"--eval_prompts {path}"):
        if len(prompts) == count:
            break
        messages = prompt_messages(record)
        if messages is None:
            raise UserError(f"--eval_prompts {path} line {number}: each line must be {{\"prompt\": text}} or "
                            f"{{\"messages\": [...]}} with a non-assistant turn; fix it or leave --eval_prompts "
                            f"unset to use the eval conversations")
        try:
            text = render(tokenizer, messages, True)
        except SkipRecord as reason:
            raise UserError(f"--eval_prompts {path} line {number}: {reason}") from None
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not prompts:
        raise UserError(f"--eval_prompts {path} holds no prompt")
    return prompts


class SampleReplies:
    """Greedy replies of the model being trained to fixed prompts, as metrics.jsonl rows."""

    def __init__(self, prompts: list[list[int]], tokenizer, max_new_tokens: int):
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.seconds = 0.0  # the last call's generation time

    def _prompt_text(self, ids: list[int]) -> str:
        text = " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())
        return text if len(text) <= PROMPT_SHOWN_CHARS else "..." + text[-PROMPT_SHOWN_CHARS:]

    @torch.no_grad()
    def rows(self, model, step: int, in_step: bool = False) -> list[dict[str, Any]]:
        """One row per prompt: step, sample index, prompt, reply and the reply's repeated-n-gram rate.

        The prompts go through `generate` together, left-padded, so each new token costs one
        forward for all of them (on a CPU, where every forward dequantizes the NF4 weights, most of the cost).
        `in_step`: every process of an FSDP run calls this with the same prompts; `generate` keeps them
        running forwards together until all are done (`synced_gpus`).
        """
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        device = next(p for p in model.parameters()).device
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in self.prompts)
        inputs = torch.tensor([[pad] * (width - len(ids)) + ids for ids in self.prompts], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in self.prompts], device=device)
        out = model.generate(input_ids=inputs, attention_mask=mask, do_sample=False, max_new_tokens=self.max_new_tokens,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                             use_cache=True,  # training turns the cache off in the model config
                             synced_gpus=in_step)
        stop_ids = {i for i in (self.tokenizer.eos_token_id, pad) if i is not None}
        rows = []
        for index, ids in enumerate(self.prompts):
            reply = out[index, width:].tolist()
            reply = reply[: next((k for k, token in enumerate(reply) if token in stop_ids), len(reply))]
            rows.append({"step": step, "sample": index, "prompt": self._prompt_text(ids),
                         "reply": self.tokenizer.decode(reply, skip_special_tokens=True),
                         "repeated_ngram_rate": round(repeated_ngram_rate(reply), 4)})
        model.train(was_training)
        self.seconds = time.perf_counter() - started
        return rows

    def summary(self, rows: list[dict[str, Any]]) -> str:
        """One line for the progress bar: how long the replies took and their repeated-n-gram rates."""
        rates = " ".join(f"{row['repeated_ngram_rate']:.2f}" for row in rows)
        return (f"step {rows[0]['step']}: {len(rows)} sample replies in {self.seconds:.1f} s, "
                f"repeated {NGRAM}-gram rate {rates} (metrics.jsonl)")


def sample_replies(args, tokenizer, eval_data: Optional[Dataset]) -> Optional[SampleReplies]:
    """The sample replies a run writes at each eval (TrainArguments' eval_* fields), or None for none.

    Raises:
        UserError: --eval_prompts is missing or malformed.
    """
    if args.eval_num_prompts == 0:
        return None
    if args.eval_prompts:
        prompts = prompts_from_file(args.eval_prompts, tokenizer, args.eval_num_prompts)
    elif eval_data is not None:
        prompts = prompts_from_eval(eval_data, args.eval_num_prompts)
    else:
        return None
    return SampleReplies(prompts, tokenizer, args.eval_max_new_tokens) if prompts else None
