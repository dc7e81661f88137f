"""The side-by-side benchmark: both sides train, and qlora_kit's loss equals the standard loop's."""

import json

import torch

from qlora_kit.bench.training import BenchSettings, compare, format_table, synthetic_examples
from qlora_kit.data.batches import collate
from qlora_kit.bench.random_model import random_quantized_model
from qlora_kit.train.loss import batch_loss_sum, count_trained_tokens
from tiny_models import VOCAB, tiny_config


def test_smoke_table_and_both_sides_trained(tmp_path):
    config_file = tmp_path / "config.json"
    tiny_config("llama").to_json_file(config_file)
    settings = BenchSettings(model=str(config_file), seq_len=64, batch_size=2, steps=2, warmup=1, lora_r=4)
    summary = compare(settings, repeats=1, timeout=300)
    table = format_table(summary)
    assert "tokens/s (trained)" in table and "baseline" in table
    for side in ("baseline", "qlora_kit"):
        (result,) = summary["runs"][side]
        assert result["trained_tokens"] > 0 and result["tokens_per_second"] > 0
        assert result["lora_b_norm"] > 0  # LoRA B starts at zero: non-zero means the optimizer stepped
    assert summary["ratio"]["tokens_per_second"] > 0
    json.dumps(summary)


def test_qlora_kit_loss_equals_the_standard_loss_on_the_same_batch():
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_kit.config import LoraArguments
    from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing

    cpu = torch.device("cpu")
    batch = collate(synthetic_examples(VOCAB, 48, 4, seed=1), pad_token_id=0)

    baseline = prepare_model_for_kbit_training(random_quantized_model(tiny_config("llama"), torch.float32, cpu))
    baseline = get_peft_model(baseline, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).train()
    expected = baseline(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    ours = random_quantized_model(tiny_config("llama"), torch.float32, cpu)
    enable_gradient_checkpointing(ours)
    ours = add_lora(ours, LoraArguments(lora_r=4, lora_dropout=0.0), torch.float32).train()
    actual = batch_loss_sum(ours, batch) / count_trained_tokens(batch["labels"])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _qlora_kit_model(compute_dtype):
    from qlora_kit.config import LoraArguments
    from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing

    model = random_quantized_model(tiny_config("llama"), compute_dtype, torch.device("cpu"))
    enable_gradient_checkpointing(model)
    torch.manual_seed(0)
    return add_lora(model, LoraArguments(lora_r=4, lora_dropout=0.0), compute_dtype).eval()


def test_packed_rows_give_the_loss_of_the_padded_batch():
    """Packing is a speed change only: the summed loss over the same examples is the padded batch's."""
    from datasets import Dataset

    from qlora_kit.data.packing import pack_dataset

    examples = synthetic_examples(VOCAB, 48, 8, seed=2)
    rows, _ = pack_dataset(Dataset.from_list([{**e, "length": len(e["input_ids"])} for e in examples]), 96)
    packed = collate(rows.to_list(), pad_token_id=0)
    padded = collate(examples, pad_token_id=0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    model = _qlora_kit_model(torch.float32)
    with torch.no_grad():
        expected = batch_loss_sum(model, padded, chunk_size=0)  # plain loss over full logits
        actual = batch_loss_sum(model, packed)  # chunked loss over packed rows
    assert count_trained_tokens(packed["labels"]) == count_trained_tokens(padded["labels"])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_bf16_frozen_weights_stay_within_tolerance_of_the_fp32_upcast():
    """qlora_kit keeps norms and embeddings in the compute dtype; peft's prepare_model_for_kbit_training upcasts."""
    from peft import prepare_model_for_kbit_training

    batch = collate(synthetic_examples(VOCAB, 48, 4, seed=3), pad_token_id=0)
    ours = _qlora_kit_model(torch.bfloat16)
    upcast = prepare_model_for_kbit_training(random_quantized_model(tiny_config("llama"), torch.bfloat16,
                                                                    torch.device("cpu")))
    assert {p.dtype for n, p in upcast.named_parameters() if "norm" in n} == {torch.float32}
    assert {p.dtype for n, p in ours.named_parameters() if "norm" in n} == {torch.bfloat16}
    with torch.no_grad():
        tokens = count_trained_tokens(batch["labels"])
        ours_loss = batch_loss_sum(ours, batch) / tokens
        upcast_loss = batch_loss_sum(upcast, batch, chunk_size=0) / tokens
    torch.testing.assert_close(ours_loss, upcast_loss, rtol=2e-2, atol=2e-2)
