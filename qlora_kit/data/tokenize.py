"""Chat messages -> input_ids and labels through the tokenizer's chat template.

Which tokens are the assistant's is found by rendering, never by guessing token offsets. For each
assistant reply the conversation is rendered up to the reply with the generation prompt (where
the model starts writing) and through the reply (where it has written the reply and its
end-of-turn marker); both renderings must be prefixes of the full rendering. The characters
between the two are the reply as the model writes it, end-of-turn marker included, and the
tokens of the full rendering that start inside a reply get labels; all others get -100.

Some templates render an earlier reply differently once later turns follow (Qwen3-style
templates drop the reasoning of earlier replies and write the last one with a think block). Such
a reply appears in the conversation in a form the model never writes at that point, so it is
kept as context, untrained, and counted (`context_replies`); the reply boundaries that do match
are trained as usual. Which case applies is decided per reply by the prefix checks above.

A text far longer than max_seq_length is not tokenized whole: only a prefix of it is, long enough
to hold max_seq_length + PREFIX_MARGIN_TOKENS tokens (first PREFIX_CHARS_PER_TOKEN characters per
token, four times more each time a prefix falls short). What the truncation policies see is
unchanged: the first max_seq_length tokens are those of the whole text, since the cut lies at
least PREFIX_MARGIN_TOKENS tokens further on, farther than a different split at the cut reaches
back; and the full count was above max_seq_length anyway. Tokenizing such a record whole would
cost tokenizer memory many times its size (docs/benchmarks.md, Data), only to cut or drop it.
Such records are counted (`prefix_only`).

A tokenizer without a chat template gets ChatML, said once. Plain text (role "text") is
tokenized as is, with the tokenizer's own special tokens and an end-of-sequence token, and every
token is trained.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Sequence

from datasets import Features, List, Value

from qlora_kit.data.fast import encoder, renderer
from qlora_kit.data.formats import TEXT_ROLE, Message, SkipRecord, to_messages
from qlora_kit.errors import UserError
from qlora_kit.log import notice_once

IGNORE_INDEX = -100
TruncationPolicy = Literal["whole_turns", "cut", "drop"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Reasons a conversation is dropped that follow from --max_seq_length and the truncation policy,
# not from a fault in the record (--strict does not turn these into errors).
LONGER_THAN_MAX = "longer than max_seq_length (--truncation_policy drop)"
NOTHING_TRAINED_WITHIN_MAX = "no trained token within max_seq_length"
LENGTH_REASONS = (LONGER_THAN_MAX, NOTHING_TRAINED_WITHIN_MAX)

PREFIX_CHARS_PER_TOKEN = 8  # the first prefix tried: this many characters per token wanted
PREFIX_MARGIN_TOKENS = 64  # tokens past max_seq_length before the cut, so the cut cannot change those kept

TOKENIZED_FEATURES = Features({
    "input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32"),
    "trained": Value("int32"), "truncated": Value("bool"), "context_replies": Value("int32"),
    "prefix_only": Value("bool"), "skip": Value("string"),
})


@dataclass(frozen=True)
class TokenizeSettings:
    """How conversations become token sequences."""

    max_seq_length: int
    assistant_only: bool = True
    truncation: TruncationPolicy = "whole_turns"


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    context_replies: int = 0
    prefix_only: bool = False  # the text was far too long: only a prefix of it was tokenized


def encode_bounded(encode: Callable[[Sequence[str]], list], texts: Sequence[str], max_seq_length: int) -> list:
    """`encode(texts)`, except that a text far longer than max_seq_length is encoded only as far as needed.

    Args:
        encode: texts -> one result per text, whose first item (or the result itself) is the token ids.
        texts: the texts.
        max_seq_length: the tokens that can be kept.

    Returns:
        (result, prefix_only) per text: for a long text, the result of a prefix that holds more than
        max_seq_length + PREFIX_MARGIN_TOKENS tokens (see the module docstring), or of the whole text
        when no shorter prefix does.
    """
    need = max_seq_length + PREFIX_MARGIN_TOKENS
    first = need * PREFIX_CHARS_PER_TOKEN
    results: list = [None] * len(texts)
    short = [i for i, text in enumerate(texts) if len(text) <= first]
    for i, result in zip(short, encode([texts[i] for i in short]) if short else []):
        results[i] = (result, False)
    for i in (i for i, text in enumerate(texts) if len(text) > first):
        results[i] = _encode_prefix(encode, texts[i], need, first)
    return results


def _encode_prefix(encode: Callable[[Sequence[str]], list], text: str, need: int, chars: int) -> tuple[Any, bool]:
    """The result of the shortest tried prefix of `text` (chars, 4 * chars, ...) holding more than `need` tokens."""
    while chars < len(text):
        result = encode([text[:chars]])[0]
        if len(result[0] if isinstance(result, tuple) else result) > need:
            return result, True
        chars *= 4
    return encode([text])[0], False


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML (said once); it is saved with the adapter."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
        notice_once("the tokenizer has no chat template: using ChatML (<|im_start|>role ... <|im_end|>), "
                    "which is saved with the tokenizer in the output folder")


def check_offsets(tokenizer) -> None:
    """Refuse, up front, a tokenizer that cannot map tokens to characters (assistant-only loss needs it)."""
    try:
        tokenizer("a b", add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) cannot map tokens to characters, which the "
                        "loss on assistant tokens needs; train on all tokens with --assistant_only_loss false") from None


def render(tokenizer, messages: list[Message], generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`; a template that refuses them skips the record."""
    try:
        return renderer(tokenizer)(messages, generation_prompt)
    except Exception as error:  # jinja's raise_exception, or a template that trips on the data
        message = " ".join(str(error).split())[:100]
        raise SkipRecord(f"the chat template refused it ({message})") from None


def reply_spans(tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]], dict[int, int], int]:
    """The full rendering, the character span of each trained reply in it, and the reply ends.

    Returns:
        (text, spans, ends, context): `ends` maps the index of each trained reply to the character
        where it ends; `context` counts the replies kept as untrained context.
    """
    full = render(tokenizer, messages)
    spans, ends, context = [], {}, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # nothing precedes it: a greeting is context, not an answer
            context += 1
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            context += 1
            continue
        spans.append((len(before), len(through)))
        ends[i] = len(through)
    return full, spans, ends, context


def _labels(ids: list[int], starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """ids where the token starts inside a span, -100 elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for begin, end in spans:
        first, last = bisect_left(starts, begin), bisect_left(starts, end)
        labels[first:last] = ids[first:last]
    return labels


@dataclass
class Rendered:
    """A conversation rendered by the chat template, with its reply spans (see `reply_spans`)."""

    messages: list[Message]
    text: str
    spans: list[tuple[int, int]]
    ends: dict[int, int]
    context: int


def tokenize_messages(tokenizer, messages: list[Message], settings: TokenizeSettings) -> TokenizedConversation:
    """Token ids and labels of one conversation, fitted to `settings.max_seq_length` by its policy."""
    if messages[0]["role"] == TEXT_ROLE:
        return _tokenize_text(tokenizer, messages[0]["content"], settings)
    rendered = Rendered(messages, *reply_spans(tokenizer, messages))
    (ids, starts), prefix_only = encode_bounded(encoder(tokenizer), [rendered.text], settings.max_seq_length)[0]
    fitted = _fit(tokenizer, rendered, ids, starts, settings)
    fitted.prefix_only = prefix_only
    return fitted


def _fit(tokenizer, rendered: Rendered, ids: list[int], starts: list[int],
         settings: TokenizeSettings) -> TokenizedConversation:
    """Labels for a rendered conversation's tokens, and the policy applied when it is too long."""
    labels = _labels(ids, starts, rendered.spans) if settings.assistant_only else list(ids)
    limit = settings.max_seq_length
    if len(ids) <= limit:
        return TokenizedConversation(ids, labels, False, rendered.context)
    if settings.truncation == "drop":
        raise SkipRecord(LONGER_THAN_MAX)
    if settings.truncation == "whole_turns":
        shorter = _whole_turns(tokenizer, rendered.messages, settings, rendered.ends, starts)
        if shorter is not None:
            return shorter
    return TokenizedConversation(ids[:limit], labels[:limit], True, rendered.context)


def _whole_turns(tokenizer, messages: list[Message], settings: TokenizeSettings, ends: dict[int, int],
                 starts: list[int]) -> TokenizedConversation | None:
    """The longest leading part of the conversation that ends on a reply and fits, or None."""
    cut = replace(settings, truncation="cut")
    replies = [i for i, message in enumerate(messages[:-1]) if i and message["role"] == "assistant"]
    for i in reversed(replies):
        if i in ends and bisect_left(starts, ends[i]) > settings.max_seq_length:
            continue  # the full rendering shows that even the part through this reply is too long
        shorter = tokenize_messages(tokenizer, messages[: i + 1], cut)
        if not shorter.truncated and trained_count(shorter.labels):
            shorter.truncated = True
            return shorter
    return None


def _tokenize_text(tokenizer, text: str, settings: TokenizeSettings) -> TokenizedConversation:
    def encode(texts: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=True)["input_ids"]

    ids, prefix_only = encode_bounded(encode, [text], settings.max_seq_length)[0]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    if len(ids) <= settings.max_seq_length:
        return TokenizedConversation(ids, list(ids), False)
    if settings.truncation == "drop":
        raise _longer_than_max(prefix_only)
    ids = ids[: settings.max_seq_length]
    return TokenizedConversation(ids, list(ids), True, prefix_only=prefix_only)


def _longer_than_max(prefix_only: bool) -> SkipRecord:
    """The drop of a too-long record, marked when only a prefix of it was tokenized (for the report)."""
    error = SkipRecord(LONGER_THAN_MAX)
    error.prefix_only = prefix_only
    return error


def tokenize_conversation(tokenizer, messages: list[Message], max_seq_length: int, assistant_only: bool = True,
                          truncation: TruncationPolicy = "whole_turns") -> TokenizedConversation:
    """Token ids and labels of one conversation (see `tokenize_messages`)."""
    return tokenize_messages(tokenizer, messages, TokenizeSettings(max_seq_length, assistant_only, truncation))


def trained_count(labels: list[int]) -> int:
    """Tokens that get a loss: labels after the first position (position t predicts label t+1)."""
    return max(0, len(labels) - 1 - labels[1:].count(IGNORE_INDEX))


def tokenize_batch(batch: dict[str, list[Any]], *, fmt: str, tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    """`datasets.map(batched=True)` function: records of a format -> token columns, or the reason to skip.

    The conversations of the batch are rendered one by one and tokenized together in one call.
    """
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    results: list[TokenizedConversation | Rendered | str] = []
    prefix_only = [False] * len(records)
    for i, record in enumerate(records):
        try:
            messages = to_messages(record, fmt)
            results.append(_tokenize_text(tokenizer, messages[0]["content"], settings)
                           if messages[0]["role"] == TEXT_ROLE else Rendered(messages, *reply_spans(tokenizer, messages)))
        except SkipRecord as reason:
            results.append(str(reason))
            prefix_only[i] = getattr(reason, "prefix_only", False)
    pending = [i for i, r in enumerate(results) if isinstance(r, Rendered)]
    encoded = encode_bounded(encoder(tokenizer), [results[i].text for i in pending], settings.max_seq_length)
    for i, ((ids, starts), only_prefix) in zip(pending, encoded):
        prefix_only[i] = only_prefix
        try:
            results[i] = _fit(tokenizer, results[i], ids, starts, settings)
        except SkipRecord as reason:
            results[i] = str(reason)
    return _columns(results, prefix_only)


def _columns(results: list[TokenizedConversation | str], prefix_only: list[bool]) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in TOKENIZED_FEATURES}
    for result, only_prefix in zip(results, prefix_only):
        skip, trained = "", 0
        if isinstance(result, TokenizedConversation):
            trained = trained_count(result.labels)
            if trained == 0:
                skip = NOTHING_TRAINED_WITHIN_MAX if result.truncated else "no trained token"
        else:
            skip = result
        tokenized = result if not skip else TokenizedConversation([], [], False)
        out["input_ids"].append(tokenized.input_ids)
        out["labels"].append(tokenized.labels)
        out["length"].append(len(tokenized.input_ids))
        out["trained"].append(trained)
        out["truncated"].append(tokenized.truncated)
        out["context_replies"].append(tokenized.context_replies)
        out["prefix_only"].append(only_prefix or (isinstance(result, TokenizedConversation) and result.prefix_only))
        out["skip"].append(skip)
    return out
