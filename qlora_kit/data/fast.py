"""Faster equivalents of `apply_chat_template` and the tokenizer call, used only where they agree.

Tokenizing a conversation renders its chat template several times (once per reply boundary), and
`apply_chat_template` spends much of each call copying and checking the messages before the
compiled Jinja template runs. Messages here are already plain {role, content} dicts of text,
so the compiled template (transformers' own, with its own globals) is called directly. Likewise the
fast tokenizer's Rust backend is called directly on a whole batch of texts. Each shortcut is taken
only after it gave exactly the library's result on a sample conversation; otherwise the library
call is used. docs/benchmarks.md (Data) has what they save.
"""

from __future__ import annotations

import json
from typing import Callable

Render = Callable[[list[dict], bool], str]
Encode = Callable[[list[str]], list[tuple[list[int], list[int]]]]

SAMPLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there! What is 2 + 2?"},
    {"role": "assistant", "content": "4, of course.\n\nAnything else?"},
    {"role": "user", "content": "No  thanks; bye."},
    {"role": "assistant", "content": "Bye!"},
]
_renderers: dict[tuple, Render] = {}
_encoders: dict[tuple, Encode] = {}


def _key(tokenizer) -> tuple:
    return id(tokenizer), str(tokenizer.chat_template), json.dumps(tokenizer.special_tokens_map, default=str)


def _library_render(tokenizer) -> Render:
    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return render


def _direct_render(tokenizer) -> Render | None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.get_chat_template())
    except Exception:  # another transformers version, or a template the direct call cannot take
        return None
    variables = dict(tokenizer.special_tokens_map)

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=generation_prompt, **variables)
    return render


def renderer(tokenizer) -> Render:
    """A function (messages, generation_prompt) -> the chat template's text, as apply_chat_template gives it."""
    key = _key(tokenizer)
    if key not in _renderers:
        library, direct = _library_render(tokenizer), _direct_render(tokenizer)
        try:
            same = direct is not None and all(direct(SAMPLE[:n], g) == library(SAMPLE[:n], g)
                                              for n in (2, 3, 5) for g in (False, True))
        except Exception:  # the template refuses the sample: no shortcut
            same = False
        _renderers[key] = direct if same else library
    return _renderers[key]


def encoder(tokenizer) -> Encode:
    """A function texts -> [(token ids, first character of each token)], special tokens taken from the text."""
    key = _key(tokenizer)
    if key not in _encoders:
        def library(texts: list[str]) -> list[tuple[list[int], list[int]]]:
            out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            return [(ids, [s for s, _ in offsets]) for ids, offsets in zip(out["input_ids"], out["offset_mapping"])]

        backend = getattr(tokenizer, "backend_tokenizer", None)

        def direct(texts: list[str]) -> list[tuple[list[int], list[int]]]:
            return [(e.ids, [s for s, _ in e.offsets]) for e in backend.encode_batch(texts, add_special_tokens=False)]

        samples = [" ".join(tokenizer.all_special_tokens) + "\nHello:\n\n", "  Two  spaces,\ttabs and ünïcödé. "]
        try:
            samples.append(_library_render(tokenizer)(SAMPLE, False))
        except Exception:  # the template refuses the sample; the other samples still compare
            pass
        try:
            same = backend is not None and direct(samples) == library(samples)
        except Exception:
            same = False
        _encoders[key] = direct if same else library
    return _encoders[key]
