"""The chunked loss equals the plain loss and its gradients, and never builds the full logits."""

import pytest
import torch
import transformers

import qlora_kit.log
from qlora_kit.config import LoraArguments, ModelArguments
from qlora_kit.bench.memory_track import LiveTensorBytes
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.errors import UserError
from qlora_kit.model.family import supported_names
from qlora_kit.train.loss import (batch_loss_sum, check_chunked_loss, count_trained_tokens, default_chunk_size,
                                  logit_head, planned_chunk_size, set_loss_chunk_size)
from tiny_models import VOCAB, save_tiny_model, tiny_model

NO_DROPOUT = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}
SOFTCAP = {"final_logit_softcapping": 5.0}


def random_batch(seed=0, batch=3, length=24):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :6] = -100              # a prompt
    labels[1, 15:] = -100             # an answer that ends early
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 18:] = 0        # padding
    labels[2, 18:] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def loss_and_grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    loss = batch_loss_sum(model, batch, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(plain, chunked):
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-4)
    assert plain[1].keys() == chunked[1].keys() and plain[1]
    for name in plain[1]:
        torch.testing.assert_close(chunked[1][name], plain[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("architecture, overrides", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("gemma2", SOFTCAP), ("gemma3", SOFTCAP), ("phi3", {}),
    ("mistral", {"tie_word_embeddings": True}),
])
def test_chunked_equals_plain_loss_and_gradients(architecture, overrides):
    model = tiny_model(architecture, **overrides).train()
    batch = random_batch()
    assert_same(loss_and_grads(model, batch, 0), loss_and_grads(model, batch, 7))


@pytest.mark.parametrize("config_class, overrides, attribute", [
    ("CohereConfig", {"logit_scale": 0.25}, "multiply"),
    ("GraniteConfig", {"logits_scaling": 4.0}, "divide"),
])
def test_models_that_scale_their_logits(config_class, overrides, attribute):
    config = getattr(transformers, config_class)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                 **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    assert getattr(logit_head(model), attribute) == next(iter(overrides.values()))
    batch = random_batch(1)
    assert_same(loss_and_grads(model, batch, 0), loss_and_grads(model, batch, 5))


def test_through_peft_nf4_and_checkpointing(tmp_path):
    folder = save_tiny_model(tmp_path / "llama", "llama")
    model = load_quantized_model(folder, ModelArguments(), torch.float32, torch.device("cpu"))
    enable_gradient_checkpointing(model)
    model = add_lora(model, LoraArguments(lora_r=4, lora_dropout=0.0), torch.float32).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    batch = random_batch(2)
    plain, chunked = loss_and_grads(model, batch, 0), loss_and_grads(model, batch, 4)
    assert_same(plain, chunked)
    assert all("lora_" in name for name in chunked[1])


def test_ignored_positions_never_reach_lm_head():
    model = tiny_model("llama").train()
    batch = random_batch()
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    batch_loss_sum(model, batch, chunk_size=8).backward()
    trained = int(count_trained_tokens(batch["labels"]))
    assert sum(rows) == 2 * trained  # each chunk runs twice: forward, and its recompute in backward
    assert max(rows) == 8 and len(rows) == 2 * -(-trained // 8)


def test_full_logits_are_never_built():
    vocab = 4096  # so that the logits are the largest tensors of this tiny model
    model = tiny_model("llama", vocab_size=vocab).train()
    for parameter in [model.lm_head.weight, model.model.embed_tokens.weight]:
        parameter.requires_grad_(False)  # frozen, as in QLoRA: their gradients would be V x H
    batch = random_batch(length=64)
    full_fp32_logits = batch["input_ids"].numel() * vocab * 4
    with LiveTensorBytes() as tracker:
        batch_loss_sum(model, batch, chunk_size=16).backward()
    assert tracker.largest == 16 * vocab * 4 < full_fp32_logits
    with LiveTensorBytes() as tracker:
        batch_loss_sum(model, batch, chunk_size=0).backward()
    assert tracker.largest >= full_fp32_logits


def test_eval_without_gradients_gives_the_same_loss():
    model = tiny_model("llama").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(batch_loss_sum(model, batch, 5), batch_loss_sum(model, batch, 0))


class DoubledLogits(transformers.LlamaForCausalLM):
    """A Llama whose forward doubles its logits, as a transformers release might change a family's head."""

    def forward(self, *args, labels=None, **kwargs):
        outputs = self.model(*args, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) * 2.0
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_changed_head_stops_at_the_first_micro_batch_check():
    torch.manual_seed(0)
    model = DoubledLogits(tiny_model("llama").config).train()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # logits of a trained model's size, not near 0
    set_loss_chunk_size(model, 4)
    with pytest.raises(UserError, match=r"chunked loss of Llama .* differs from the model's own loss"):
        check_chunked_loss(model, random_batch())
    assert model.training  # the check gives the mode back
    chunked, own = check_chunked_loss(tiny_model("gemma2", **SOFTCAP).train(), random_batch())
    assert abs(chunked - own) < 1e-4


def test_unknown_family_trains_with_the_plain_loss_and_says_so(monkeypatch, said):
    monkeypatch.setattr(qlora_kit.log, "_said", set())
    model = tiny_model("gpt2", **NO_DROPOUT["gpt2"]).train()
    assert logit_head(model) is None
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    batch = random_batch()
    loss = batch_loss_sum(model, batch, chunk_size=4)
    assert rows == [batch["input_ids"].numel()]  # one call on every position: the plain loss
    assert [r.getMessage() for r in said] == [
        f"plain loss over full logits, not the chunked loss: model type 'gpt2' is not a known family "
        f"(known: {supported_names()})"]
    torch.testing.assert_close(loss, batch_loss_sum(model, batch, chunk_size=0))
    assert check_chunked_loss(model, batch) is None
    assert planned_chunk_size("gpt2", VOCAB, None) == 0 and planned_chunk_size("llama", VOCAB, None) > 0


def test_chunk_size_setting_and_default():
    assert default_chunk_size(128256) == 512 and default_chunk_size(49152) == 1024 and default_chunk_size(256000) == 256
    assert default_chunk_size(100) == 8192
    model = tiny_model("llama").train()
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    set_loss_chunk_size(model, 3)
    with torch.no_grad():
        batch_loss_sum(model, random_batch())
    assert max(rows) == 3
