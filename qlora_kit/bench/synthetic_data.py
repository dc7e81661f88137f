"""Synthetic multi-turn conversations, seeded, for tests and the tokenization benchmark.

The words are drawn from a fixed list with a Zipf-like skew, so the text tokenizes like prose
(common short words, some longer ones) rather than like random characters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
