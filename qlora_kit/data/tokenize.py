"""Chat messages -> input_ids and labels through the tokenizer's chat template.

Which tokens are the assistant's is found by rendering, not by guessing token offsets: for each
assistant turn, the conversation is rendered up to the turn (with the generation prompt) and up
to its end; the characters between the two are the reply, end-of-turn marker included. Tokens
of the full rendering that start inside a reply get labels; all others get -100.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_kit.errors import UserError

IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(
                "this chat template renders earlier turns differently from later ones, so assistant "
                "tokens cannot be found by rendering; train on all tokens with --assistant_only_loss false"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(
    tokenizer, messages: list[dict], max_seq_length: int, assistant_only: bool = True
) -> TokenizedConversation:
    """Token ids and labels of one conversation, cut to `max_seq_length` tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if assistant_only:
        labels = [
            token if any(start <= char_start < end for start, end in spans) else IGNORE_INDEX
            for token, (char_start, _) in zip(ids, encoded["offset_mapping"])
        ]
    else:
        labels = list(ids)
    truncated = len(ids) > max_seq_length
    return TokenizedConversation(ids[:max_seq_length], labels[:max_seq_length], truncated)
