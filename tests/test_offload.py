"""Activation offload gives the same gradients as keeping the checkpoints, and moves what it says."""

import pytest
import torch

from qlora_kit.config import LoraArguments, ModelArguments, parse
from qlora_kit.errors import UserError
from qlora_kit.memory.apply import apply_memory_settings
from qlora_kit.memory.offload import enable_activation_offload
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.train.loss import batch_loss_sum
from tiny_models import HIDDEN, LAYERS, VOCAB, save_tiny_model

CPU = torch.device("cpu")
BATCH, LENGTH = 2, 24


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("offload") / "llama", "llama")


def lora_model(folder, device=CPU, dtype=torch.float32, checkpointing=True):
    model = load_quantized_model(folder, ModelArguments(), dtype, device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraArguments(lora_r=4, lora_dropout=0.2), dtype)  # dropout: the recompute must redraw it
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model.train()


def gradients(model, device=CPU, length=LENGTH):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, length), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(2)
    batch_loss_sum(model, batch).backward()
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_gradients(expected, actual, rtol=0.0, atol=0.0):
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_offload_gives_the_same_gradients_as_checkpointing_and_as_neither(tiny_folder):
    plain = gradients(lora_model(tiny_folder, checkpointing=False))
    checkpointed = gradients(lora_model(tiny_folder))
    model = lora_model(tiny_folder)
    offloader = enable_activation_offload(model, CPU)
    offloaded = gradients(model)
    assert_equal_gradients(plain, checkpointed)
    assert_equal_gradients(checkpointed, offloaded)
    assert offloader.offloaded_bytes == LAYERS * BATCH * LENGTH * HIDDEN * 4  # one fp32 input per layer


def test_disable_gives_the_checkpoint_function_back(tiny_folder):
    model = lora_model(tiny_folder)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    before = [m._gradient_checkpointing_func for m in layers]
    offloader = enable_activation_offload(model, CPU)
    assert all(m._gradient_checkpointing_func == offloader.checkpoint for m in layers)
    offloader.disable()
    assert [m._gradient_checkpointing_func for m in layers] == before


def test_the_recipe_setting_turns_it_on_and_needs_checkpointing(tiny_folder):
    config = parse(["--offload_activations", "true", "--gpu_memory", "none"])
    model = lora_model(tiny_folder)
    offloader = apply_memory_settings(model, config, None, CPU)
    gradients(model)
    assert offloader is not None and offloader.offloaded_bytes > 0
    no_checkpoints = parse(["--offload_activations", "true", "--gradient_checkpointing", "false", "--gpu_memory", "none"])
    with pytest.raises(UserError, match="needs --gradient_checkpointing true"):
        apply_memory_settings(lora_model(tiny_folder, checkpointing=False), no_checkpoints, None, CPU)


@pytest.mark.gpu
def test_cuda_offload_same_gradients_and_less_gpu_memory(tmp_path):
    layers, hidden, length = 8, 512, 512
    folder = save_tiny_model(tmp_path / "wide", "llama", hidden_size=hidden, intermediate_size=1024,
                             num_hidden_layers=layers)
    device, dtype = torch.device("cuda"), torch.bfloat16
    one_layer = BATCH * length * hidden * 2
    kept = lora_model(folder, device, dtype)
    torch.cuda.reset_peak_memory_stats()
    expected = gradients(kept, device, length)
    peak_kept = torch.cuda.max_memory_allocated()
    del kept
    model = lora_model(folder, device, dtype)
    offloader = enable_activation_offload(model, device)
    torch.cuda.reset_peak_memory_stats()
    actual = gradients(model, device, length)
    peak_offloaded = torch.cuda.max_memory_allocated()
    assert_equal_gradients(expected, actual, rtol=0.02, atol=1e-4)  # CUDA attention backward uses atomics
    assert offloader.offloaded_bytes == layers * one_layer
    assert peak_offloaded <= peak_kept - (layers - 4) * one_layer
