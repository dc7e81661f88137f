"""bitsandbytes' AVX512-BF16 CPU repack, forced on and off: qlora_kit's 4-bit layers keep one layout and
the same numerics on every CPU (qlora_kit/model/bnb_cpu.py)."""

import bitsandbytes as bnb
import bitsandbytes.nn.modules
import pytest
import torch

from qlora_kit.config import ModelArguments
from qlora_kit.model.bnb_cpu import canonical_weight, four_bit_layers, is_repacked, keep_canonical_layout
from qlora_kit.model.load import load_quantized_model
from qlora_kit.bench.random_model import random_quantized_model
from qlora_kit.model.stream_load import load_streaming
from tiny_models import save_tiny_model, tiny_config

CPU = torch.device("cpu")


def force_cpu_feature(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: present)


def assert_canonical(layer: bnb.nn.Linear4bit) -> None:
    state = layer.weight.quant_state
    rows, cols = state.shape
    assert not is_repacked(layer.weight)
    assert tuple(layer.weight.shape) == ((rows * cols + 1) // 2, 1)
    assert state.nested and state.state2 is not None and state.absmax.dtype == torch.uint8


@torch.no_grad()
def eval_logits(model) -> torch.Tensor:
    ids = torch.arange(1, 33).reshape(2, 16)
    return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bnb_cpu") / "llama", "llama")


@pytest.mark.parametrize("loader", ["from_pretrained", "streaming"])
def test_eval_gives_the_same_logits_and_layout_with_and_without_the_cpu_feature(monkeypatch, tiny_folder, loader):
    args = ModelArguments(model_name_or_path=str(tiny_folder))

    def load():
        if loader == "streaming":
            return load_streaming(tiny_folder, args, torch.float32, CPU)
        return load_quantized_model(tiny_folder, args, torch.float32, CPU)

    results = {}
    for present in (False, True):
        force_cpu_feature(monkeypatch, present)
        model = load()
        logits = eval_logits(model)
        eval_logits(model)  # a second eval forward: bitsandbytes repacks on the first, computes packed after
        for layer in four_bit_layers(model):
            assert_canonical(layer)
        results[present] = logits
    assert torch.equal(results[False], results[True])


def test_random_models_are_built_with_the_repack_off(monkeypatch):
    force_cpu_feature(monkeypatch, True)
    model = random_quantized_model(tiny_config("llama"), torch.float32, CPU)
    eval_logits(model)
    layers = four_bit_layers(model)
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    for layer in layers:
        assert_canonical(layer)


def repacked_layer(tiny_folder) -> tuple[bnb.nn.Linear4bit, torch.Tensor, torch.Tensor]:
    """A loaded 4-bit layer that bitsandbytes repacked (as it does on a CPU with AVX512-BF16), with its
    canonical bytes and dequantized weight from before."""
    model = load_quantized_model(tiny_folder, ModelArguments(model_name_or_path=str(tiny_folder)), torch.float32, CPU)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.data.clone()
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer.eval()(torch.ones(1, layer.in_features))
    assert is_repacked(layer.weight) and layer.weight.shape != before.shape  # what bitsandbytes did
    return layer, before, dense


def test_a_repacked_weight_reads_back_in_the_canonical_layout(tiny_folder):
    layer, before, dense = repacked_layer(tiny_folder)
    packed, state = canonical_weight(layer.weight)
    assert_canonical(layer)
    assert torch.equal(packed, before)  # the 4-bit codes come back exactly
    again = bnb.functional.dequantize_4bit(packed, state)
    # the block scales went through bf16 (8 bits of mantissa) and were double-quantized again
    assert torch.allclose(again, dense, rtol=2 ** -6, atol=1e-6)


def test_keeping_the_layout_undoes_a_repack_done_before_and_turns_it_off(tiny_folder):
    layer, before, _ = repacked_layer(tiny_folder)
    keep_canonical_layout(layer)
    assert not layer.support_avx512bf16_for_cpu
    assert_canonical(layer)
    with torch.no_grad():
        layer(torch.ones(1, layer.in_features))
    assert torch.equal(layer.weight.data, before)
