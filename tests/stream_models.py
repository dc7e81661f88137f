"""Shared by the streaming tests: one CPU thread, and tiny LoRA models loaded with or without streaming."""

from __future__ import annotations

import pytest
import torch

from qlora_kit.bench.random_model import perturb_adapter
from qlora_kit.config import LoraArguments, ModelArguments
from qlora_kit.memory.stream import setup_streaming
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.model.stream_load import load_streaming

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model(folder, resident_layers=-1, in_flight=2, checkpointing=True, dropout=0.0, device=CPU):
    """A tiny model with LoRA (B random, so every gradient is non-zero); streamed when resident_layers >= 0."""
    args = ModelArguments(model_name_or_path=str(folder))
    if resident_layers >= 0:
        model = load_streaming(folder, args, torch.float32, device, resident_layers=resident_layers)
    else:
        model = load_quantized_model(folder, args, torch.float32, device)
    streamer = setup_streaming(model, resident_layers, in_flight, device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(0)
    model = add_lora(model, LoraArguments(lora_r=4, lora_dropout=dropout), lora_dtype=torch.float32)
    perturb_adapter(model, seed=3, scale=0.1)  # B starts at zero, which would make every lora_A gradient zero
    model.train()
    return model, streamer
