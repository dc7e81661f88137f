"""Packing: rows of whole sequences, and no token attends across a sequence boundary."""

import random

import pytest
import torch
import transformers
from datasets import Dataset

from qlora_kit.data.batches import collate, model_inputs
from qlora_kit.data.packing import pack_dataset, pack_rows
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.train.loss import batch_loss_sum, token_loss_sum
from tiny_models import VOCAB, tiny_config

LENGTHS = (9, 5, 12, 3)


def sequences(seed=0):
    rng = random.Random(seed)
    out = []
    for n in LENGTHS:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        labels = [IGNORE_INDEX if i < n // 3 else token for i, token in enumerate(ids)]  # a prompt, then a reply
        out.append({"input_ids": ids, "labels": labels, "length": n})
    return out


def model(architecture, attn_implementation, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = tiny_config(architecture, **overrides)
    built = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return built.eval()


def packed_batch(examples, capacity=32):
    packed, _ = pack_dataset(Dataset.from_list(examples), capacity)
    return collate([packed[i] for i in range(len(packed))], pad_token_id=0), packed


def test_rows_hold_every_sequence_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 128) * 1.1  # best-fit decreasing wastes little
    assert rows == pack_rows(lengths, 128)


def test_packed_columns_restart_positions_and_mask_each_first_label():
    examples = sequences()
    batch, packed = packed_batch(examples)
    assert len(packed) == 1 and sorted(len(x) for x in packed["input_ids"]) == [sum(LENGTHS)]
    positions = packed[0]["position_ids"]
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == len(LENGTHS)
    assert all(packed[0]["labels"][s] == IGNORE_INDEX for s in starts)
    assert batch["attention_mask"].sum() == sum(LENGTHS)


def spans_of(position_ids):
    """(start, end) of each sequence in a packed row, from where the positions restart."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def on(device, batch):
    return {key: value.to(device) for key, value in batch.items()}


def assert_isolated(net, attn, device="cpu", tol=1e-4):
    """Each sequence of a packed row has the logits it has alone, and the row's loss is the sum of theirs."""
    examples = sequences()
    _, packed = packed_batch(examples)
    short = {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "position_ids": [0, 1, 2]}
    batch = on(device, collate([packed[0], short], pad_token_id=0))  # the short row's padding is a sequence too
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    with torch.no_grad():
        packed_logits = net(**model_inputs(batch, attn)).logits.float()
        packed_loss = batch_loss_sum(net, batch)
        alone_loss = batch_loss_sum(net, on(device, collate([short], 0)))
        for start, end in spans_of(packed[0]["position_ids"]):
            alone = on(device, collate([by_ids[tuple(packed[0]["input_ids"][start:end])]], 0))
            alone_logits = net(**model_inputs(alone, attn)).logits.float()
            torch.testing.assert_close(packed_logits[0, start:end], alone_logits[0], rtol=tol, atol=tol)
            alone_loss += token_loss_sum(alone_logits, alone["labels"])
        short_alone = net(torch.tensor([[5, 6, 7]], device=device)).logits[0].float()
    torch.testing.assert_close(packed_logits[1, :3], short_alone, rtol=tol, atol=tol)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("architecture, attn, overrides", [
    ("llama", "sdpa", {}),
    ("llama", "eager", {}),
    ("qwen3", "sdpa", {}),
    ("mistral", "sdpa", {"sliding_window": 4}),
    ("gemma3", "eager", {"sliding_window": 4}),
    ("gpt2", "sdpa", {}),
])
def test_a_sequence_packed_with_others_has_the_logits_and_loss_it_has_alone(architecture, attn, overrides):
    assert_isolated(model(architecture, attn, **overrides), attn)


@pytest.mark.gpu
@pytest.mark.parametrize("architecture, attn, overrides", [
    ("llama", "sdpa", {}),
    ("mistral", "sdpa", {"sliding_window": 4}),
    ("gemma3", "sdpa", {"sliding_window": 4}),
    ("llama", "flash_attention_2", {}),
    ("qwen3", "flash_attention_2", {}),
])
def test_packed_sequences_stay_isolated_on_cuda(architecture, attn, overrides):
    if "flash" in attn and not transformers.utils.is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed")
    dtype = torch.bfloat16 if "flash" in attn else torch.float32  # flash attention takes half precision only
    net = model(architecture, attn, dtype=dtype, **overrides).to("cuda")
    assert_isolated(net, attn, "cuda", tol=3e-2 if dtype == torch.bfloat16 else 1e-4)


def test_the_same_row_without_restarting_positions_leaks_across_sequences():
    """The isolation check can fail: the row read as one sequence gives other logits."""
    net = model("llama", "sdpa")
    batch, _ = packed_batch(sequences())
    joined = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        isolated = net(**model_inputs(batch, "sdpa")).logits
        leaky = net(**model_inputs(joined, "sdpa")).logits
    assert not torch.allclose(isolated[0, -5:], leaky[0, -5:], atol=1e-3)


def test_flash_layout_puts_rows_end_to_end_with_labels_aligned():
    """For flash attention the rows go end to end in one row; the loss must not change."""
    net = model("llama", "sdpa")
    examples = sequences()
    batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"], "position_ids": list(range(e["length"]))}
                     for e in examples], 0)
    flat = model_inputs(batch, "flash_attention_2")
    assert flat["input_ids"].shape == (1, batch["input_ids"].numel()) and "attention_mask" not in flat
    with torch.no_grad():
        flat_loss = token_loss_sum(net(**flat).logits, batch["labels"])
        per_row = batch_loss_sum(net, batch)
    torch.testing.assert_close(flat_loss, per_row, rtol=1e-4, atol=1e-4)
