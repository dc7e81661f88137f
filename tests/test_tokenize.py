"""Loss only on assistant tokens, found by rendering the real demo chat template."""

from qlora_kit.data.tokenize import IGNORE_INDEX, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


def trained_text(tokenizer, tokenized):
    return tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_replies_and_their_end_of_turn(demo_tokenizer):
    tokenized = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=512)
    assert trained_text(demo_tokenizer, tokenized) == "Four.<|im_end|>\nSix, of course.<|im_end|>\n"
    assert tokenized.input_ids == demo_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert not tokenized.truncated


def test_labelled_tokens_equal_their_input_ids(demo_tokenizer):
    tokenized = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=512)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(tokenized.input_ids, tokenized.labels))


def test_all_tokens_when_asked(demo_tokenizer):
    tokenized = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=512, assistant_only=False)
    assert tokenized.labels == tokenized.input_ids


def test_truncation_is_reported(demo_tokenizer):
    tokenized = tokenize_conversation(demo_tokenizer, CONVERSATION, max_seq_length=10)
    assert len(tokenized.input_ids) == 10 and tokenized.truncated
