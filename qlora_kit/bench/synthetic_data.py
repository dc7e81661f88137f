"""Synthetic data, seeded, for tests and benchmarks: multi-turn conversations, and tokenized examples.

The conversations' words are drawn from a fixed list with a Zipf-like skew, so the text tokenizes
like prose (common short words, some longer ones) rather than like random characters.

Tokenized examples (`random_token_examples`) are random ids whose first part is a prompt (labels
-100): `synthetic_examples` makes the speed benchmark's, `synthetic_dataset` the resilience checks'.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from qlora_kit.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset

WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such follow act why "
    "ask men change went light kind off need house picture try us again animal point mother world near build "
    "self earth father head stand own page should country found answer school grow study still learn plant "
    "cover food sun four between state keep eye never last let thought city tree cross farm hard start might "
    "story saw far sea draw left late run while press close night real life few north quantization adapter "
    "gradient checkpoint optimizer tokenizer transformer attention embedding throughput"
).split()
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You answer briefly and precisely.",
                  "You are a patient teacher who explains each step.")


def _sentence(rng: random.Random, words: int) -> str:
    picked = [WORDS[min(int(rng.paretovariate(1.2)) - 1, len(WORDS) - 1) if rng.random() < 0.6
                    else rng.randrange(len(WORDS))] for _ in range(words)]
    return " ".join(picked).capitalize() + rng.choice(".?!")


def _text(rng: random.Random, low: int, high: int) -> str:
    total, parts = rng.randint(low, high), []
    while total > 0:
        n = min(total, rng.randint(4, 16))
        parts.append(_sentence(rng, n))
        total -= n
    return " ".join(parts)


def synthetic_conversations(count: int, seed: int = 0, max_exchanges: int = 4) -> list[list[dict[str, str]]]:
    """`count` conversations of 1 to `max_exchanges` user/assistant exchanges, some with a system prompt."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, max_exchanges)):
            messages.append({"role": "user", "content": _text(rng, 5, 40)})
            messages.append({"role": "assistant", "content": _text(rng, 10, 90)})
        conversations.append(messages)
    return conversations


def write_jsonl(conversations: list[list[dict[str, str]]], path: Path) -> Path:
    """Write conversations as a `messages` .jsonl file."""
    with open(path, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def random_token_examples(count: int, vocab_size: int, lengths: tuple[int, int], first_id: int, seed: int = 0,
                          prompt_share: Optional[tuple[float, float]] = None) -> list[dict[str, list[int]]]:
    """Examples of random ids in [first_id, vocab_size), of lengths in `lengths` (both included), whose
    first part is a prompt (labels -100): a share drawn from `prompt_share`, or a third when it is None."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(*lengths)
        prompt = int(length * rng.uniform(*prompt_share)) if prompt_share else length // 3
        ids = [rng.randrange(first_id, vocab_size) for _ in range(length)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def synthetic_examples(vocab_size: int, seq_len: int, count: int, seed: int) -> list[dict[str, list[int]]]:
    """Chat-like examples: random tokens, lengths in [seq_len/8, seq_len], the first 30-60% a prompt."""
    return random_token_examples(count, vocab_size, (max(8, seq_len // 8), seq_len), 3, seed, prompt_share=(0.3, 0.6))


def synthetic_dataset(examples: int, max_length: int, vocab_size: int, seed: int = 0) -> Dataset:
    """Random token sequences of varied length; the first third of each is a prompt (labels -100)."""
    from datasets import Dataset

    return Dataset.from_list(random_token_examples(examples, vocab_size, (max_length // 2, max_length), 1, seed))
