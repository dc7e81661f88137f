"""The frozen base really is NF4 through bitsandbytes, and the adapters are what was asked for."""

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer

from qlora_kit.config import LoraArguments, ModelArguments
from qlora_kit.errors import UserError
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing, trainable_report
from qlora_kit.model.targets import find_projections
from tiny_models import EXPECTED_PROJECTIONS, HIDDEN, INTERMEDIATE, KV_HEADS, HEADS, LAYERS, save_tiny_model

CPU = torch.device("cpu")


def load(tmp_path, architecture="llama", compute_dtype=torch.float32):
    folder = save_tiny_model(tmp_path / architecture, architecture)
    return load_quantized_model(folder, ModelArguments(model_name_or_path=str(folder)), compute_dtype, CPU)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_projections_are_packed_nf4_with_double_quant(tmp_path, architecture):
    model = load(tmp_path, architecture)
    projections = find_projections(model)
    blocks = model.get_submodule(projections.blocks_path)
    for block in blocks:
        for name in projections.names:
            layer = block.get_submodule(name)
            assert isinstance(layer, bnb.nn.Linear4bit), name
            weight = layer.weight
            assert weight.dtype == torch.uint8 and weight.numel() * 2 == layer.in_features * layer.out_features
            state = weight.quant_state
            assert state.quant_type == "nf4" and state.blocksize == 64
            assert state.nested and state.state2 is not None  # the block scales are quantized too
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    assert not any(p.requires_grad for p in model.parameters())


def test_lora_weights_in_bf16_on_every_projection(tmp_path):
    model = load(tmp_path, compute_dtype=torch.bfloat16)
    model = add_lora(model, LoraArguments(lora_r=4, lora_alpha=8), lora_dtype=torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable.values())
    assert all("lora_" in n for n in trainable)
    adapted = sorted({n.split("layers.")[1].split(".", 1)[1] for n, m in model.named_modules() if isinstance(m, LoraLayer)})
    assert adapted == sorted(EXPECTED_PROJECTIONS["llama"])


def test_trainable_count_is_r_times_in_plus_out(tmp_path):
    r = 4
    model = add_lora(load(tmp_path), LoraArguments(lora_r=r), lora_dtype=torch.float32)
    head_dim = HIDDEN // HEADS
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV_HEADS * head_dim), (HIDDEN, KV_HEADS * head_dim), (HIDDEN, HIDDEN),
              (HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    expected = LAYERS * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert f"trainable {expected:,} of {total:,}" in trainable_report(model)


def test_rslora_and_dora_switches(tmp_path):
    model = add_lora(load(tmp_path), LoraArguments(lora_r=4, lora_alpha=8, use_rslora=True, use_dora=True),
                     lora_dtype=torch.float32)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    assert "default" in layer.lora_magnitude_vector


def test_named_targets_are_checked(tmp_path):
    with pytest.raises(UserError, match="lacks.*q_proj"):
        add_lora(load(tmp_path), LoraArguments(lora_target_modules="q_proj,wq"), lora_dtype=torch.float32)


def test_lm_head_adapted_only_when_named(tmp_path):
    model = add_lora(load(tmp_path), LoraArguments(lora_target_modules="q_proj,lm_head"), lora_dtype=torch.float32)
    assert isinstance(model.base_model.model.lm_head, LoraLayer)


def test_gradients_reach_lora_through_checkpointing(tmp_path):
    model = load(tmp_path)
    enable_gradient_checkpointing(model)
    model = add_lora(model, LoraArguments(lora_r=4), lora_dtype=torch.float32)
    model.train()
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
