"""Tokenization by rendering: trained tokens, templates that render earlier turns differently, length policies."""

import pytest

from qlora_kit.data.formats import SkipRecord
from qlora_kit.data.tokenize import (CHATML_TEMPLATE, IGNORE_INDEX, LONGER_THAN_MAX, TokenizeSettings,
                                     ensure_chat_template, render, tokenize_batch, tokenize_conversation,
                                     tokenize_messages)
from qlora_kit.model.tokenizer import load_tokenizer

# The assistant branch of Qwen3's chat template: replies after the last user message are written with
# a think block (the last one always), earlier ones without their reasoning.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query_index=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
STRICT_ALTERNATION = (
    "{%- for message in messages %}{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
THREE_EXCHANGES = [
    {"role": "user", "content": "First question, about the weather today?"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Second question: and tomorrow?"},
    {"role": "assistant", "content": "Rain, most likely."},
    {"role": "user", "content": "Third question: what about the whole next week, day by day?"},
    {"role": "assistant", "content": "Sun on Monday, rain on Tuesday, and fog for the rest of the week."},
]


@pytest.fixture
def tokenizer(demo_model_dir):
    """A fresh copy of the demo tokenizer, free to change."""
    return load_tokenizer(demo_model_dir)


def trained_text(tokenizer, tokenized):
    return tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX])


def test_template_that_drops_earlier_reasoning_trains_only_replies_as_the_model_writes_them(tokenizer):
    tokenizer.chat_template = QWEN3_STYLE
    conversation = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5."},
        {"role": "user", "content": "And 2*3?"},
        {"role": "assistant", "content": "<think>\nMultiply them.\n</think>\n\n6."},
    ]
    full = render(tokenizer, conversation)
    assert "Add them" not in full and "<|im_start|>assistant\n5.<|im_end|>" in full  # the earlier form
    tokenized = tokenize_conversation(tokenizer, conversation, max_seq_length=512)
    assert tokenized.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert trained_text(tokenizer, tokenized) == "<think>\nMultiply them.\n</think>\n\n6.<|im_end|>\n"
    assert tokenized.context_replies == 1


def test_a_template_that_refuses_a_conversation_skips_that_record(tokenizer):
    tokenizer.chat_template = STRICT_ALTERNATION
    with pytest.raises(SkipRecord, match="the chat template refused it .*must alternate"):
        tokenize_conversation(tokenizer, [{"role": "system", "content": "Be brief."}, *THREE_EXCHANGES[:2]], 512)
    assert tokenize_conversation(tokenizer, THREE_EXCHANGES[:2], 512).input_ids


def test_whole_turns_keeps_the_leading_exchanges_that_fit(tokenizer):
    two = tokenize_conversation(tokenizer, THREE_EXCHANGES[:4], max_seq_length=1000)
    full = tokenize_conversation(tokenizer, THREE_EXCHANGES, max_seq_length=1000)
    assert len(two.input_ids) < len(full.input_ids)
    kept = tokenize_conversation(tokenizer, THREE_EXCHANGES, max_seq_length=len(full.input_ids) - 1)
    assert kept.truncated and kept.input_ids == two.input_ids and kept.labels == two.labels
    assert trained_text(tokenizer, kept).endswith("Rain, most likely.<|im_end|>\n")


def test_whole_turns_cuts_when_not_even_the_first_reply_fits(tokenizer):
    first = tokenize_conversation(tokenizer, THREE_EXCHANGES[:2], max_seq_length=1000)
    cut = tokenize_conversation(tokenizer, THREE_EXCHANGES, max_seq_length=len(first.input_ids) - 2)
    assert cut.truncated and cut.input_ids == first.input_ids[:-2]


def test_cut_and_drop_policies(tokenizer):
    cut = tokenize_conversation(tokenizer, THREE_EXCHANGES, max_seq_length=40, truncation="cut")
    assert cut.truncated and len(cut.input_ids) == 40
    with pytest.raises(SkipRecord, match="longer than max_seq_length"):
        tokenize_conversation(tokenizer, THREE_EXCHANGES, max_seq_length=40, truncation="drop")


def test_no_chat_template_means_chatml_said_once(tokenizer, said):
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert any("no chat template: using ChatML" in r.getMessage() for r in said)
    tokenized = tokenize_conversation(tokenizer, THREE_EXCHANGES[:2], 512)
    assert trained_text(tokenizer, tokenized) == "It is sunny.<|im_end|>\n"


def test_plain_text_trains_every_token_and_ends_with_eos(tokenizer):
    settings = TokenizeSettings(max_seq_length=512)
    tokenized = tokenize_messages(tokenizer, [{"role": "text", "content": "Once upon a time."}], settings)
    assert tokenized.labels == tokenized.input_ids and tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenized.input_ids[:-1]) == "Once upon a time."


def test_a_batch_gives_the_same_tokens_as_one_by_one_and_says_why_it_skips(tokenizer):
    good = [{"messages": THREE_EXCHANGES[:2]}, {"messages": THREE_EXCHANGES}]
    bad = {"messages": [{"role": "user", "content": "Hello?"}]}
    records = [good[0], bad, good[1]]
    out = tokenize_batch({"messages": [r["messages"] for r in records]}, fmt="messages", tokenizer=tokenizer,
                         settings=TokenizeSettings(max_seq_length=512))
    assert out["skip"] == ["", "no assistant turn", ""]
    for row, record in ((0, good[0]), (2, good[1])):
        alone = tokenize_conversation(tokenizer, record["messages"], 512)
        assert out["input_ids"][row] == alone.input_ids and out["labels"][row] == alone.labels
        assert out["trained"][row] == sum(label != IGNORE_INDEX for label in alone.labels[1:])
    assert LONGER_THAN_MAX.startswith("longer than max_seq_length")


def test_the_faster_render_and_encode_agree_with_the_library(tokenizer):
    from qlora_kit.data.fast import encoder, renderer

    for generation_prompt in (False, True):
        assert renderer(tokenizer)(THREE_EXCHANGES[:3], generation_prompt) == tokenizer.apply_chat_template(
            THREE_EXCHANGES[:3], tokenize=False, add_generation_prompt=generation_prompt)
    text = tokenizer.apply_chat_template(THREE_EXCHANGES, tokenize=False)
    ids, starts = encoder(tokenizer)([text])[0]
    reference = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == reference["input_ids"] and starts == [s for s, _ in reference["offset_mapping"]]
