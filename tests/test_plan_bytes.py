"""The planner against real tensors on the CPU: byte for byte for the loaded demo model, and the
activations autograd keeps, counted with saved-tensor hooks and a live-tensor tracker."""

import bitsandbytes as bnb
import pytest
import torch

from qlora_kit.config import LoraArguments, ModelArguments, TrainArguments
from qlora_kit.memory import activations as act
from qlora_kit.memory.budget import PlanSettings, adapted_linears, lora_tensor_numels, optimizer_state_bytes, weight_bytes
from qlora_kit.bench.memory_measure import predicted, random_batch
from qlora_kit.memory.shapes import meta_model, model_shape, shape_from_model
from qlora_kit.bench.memory_track import LiveTensorBytes
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.bench.random_model import random_quantized_model
from qlora_kit.train.loss import batch_loss_sum, set_loss_chunk_size
from qlora_kit.train.optim import build_optimizer
from tiny_models import save_tiny_model, tiny_config

CPU = torch.device("cpu")


def storage_bytes(tensors) -> int:
    """Bytes of distinct storages, as the allocator holds them."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def frozen_base_tensors(model):
    for parameter in model.parameters():
        if parameter.requires_grad:
            continue
        yield parameter
        if isinstance(parameter, bnb.nn.Params4bit):
            state = parameter.quant_state
            yield from (state.absmax, state.code, state.offset)
            if state.state2 is not None:
                yield from (state.state2.absmax, state.state2.code)


@pytest.fixture(scope="module")
def demo_lora(demo_model_dir):
    model = load_quantized_model(demo_model_dir, ModelArguments(), torch.float32, CPU)
    return add_lora(model, LoraArguments(lora_r=8, lora_alpha=16), torch.float32)


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch"])
def test_demo_model_bytes_match_the_planner_exactly(demo_lora, demo_model_dir, optim):
    shape = model_shape(str(demo_model_dir))
    numels = lora_tensor_numels(adapted_linears(shape, "all"), r=8)
    trainable = [p for p in demo_lora.parameters() if p.requires_grad]
    assert storage_bytes(frozen_base_tensors(demo_lora)) == weight_bytes(shape, compute_bytes=4).total
    assert storage_bytes(trainable) == sum(numels) * 4

    optimizer = build_optimizer(trainable, TrainArguments(optim=optim), CPU)
    ids = torch.randint(0, 1000, (2, 16))
    demo_lora(input_ids=ids, labels=ids).loss.backward()
    assert storage_bytes(p.grad for p in trainable) == sum(numels) * 4
    optimizer.step()
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert storage_bytes(states) == optimizer_state_bytes(numels, optim, param_bytes=4)
    optimizer.zero_grad(set_to_none=True)


def saved_by_one_block(tmp_path, architecture, dtype, dropout, mask, attn="sdpa"):
    """Bytes autograd keeps for one decoder block (parameters and the shared rotary tables excluded)."""
    sizes = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=1000)
    folder = save_tiny_model(tmp_path / architecture, architecture, **sizes)
    model = load_quantized_model(folder, ModelArguments(attn_implementation=attn), dtype, CPU)
    model = add_lora(model, LoraArguments(lora_r=8, lora_dropout=dropout), dtype).train()
    decoder = model.get_base_model().model
    batch, seq = 2, 64
    hidden = torch.randn(batch, seq, 128, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    rotary = decoder.rotary_emb(hidden, positions)
    padding = torch.ones(batch, 1, seq, seq, dtype=torch.bool).tril() if mask else None
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rotary, hidden]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip and (padding is None or tensor is not padding):
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder.layers[0](hidden, attention_mask=padding, position_embeddings=rotary, position_ids=positions)
    shape = shape_from_model(meta_model(model.config), model.config)
    settings = PlanSettings(micro_batch_size=batch, max_seq_length=seq, lora_r=8, lora_dropout=dropout,
                           compute_dtype=str(dtype).removeprefix("torch."), padded_batches=mask, attn_implementation=attn)
    return sum(saved.values()), act.layer_saved_bytes(shape, settings), shape, settings


@pytest.mark.parametrize("architecture, dtype, mask, attn", [
    ("llama", torch.bfloat16, False, "sdpa"), ("llama", torch.bfloat16, True, "sdpa"), ("llama", torch.float32, False, "sdpa"),
    ("qwen3", torch.bfloat16, True, "sdpa"), ("gemma2", torch.bfloat16, True, "eager"),
])
def test_saved_activations_of_one_block_match_exactly(tmp_path, architecture, dtype, mask, attn):
    measured, planned, _, _ = saved_by_one_block(tmp_path, architecture, dtype, 0.0, mask, attn)
    assert planned == measured


def test_saved_activations_with_lora_dropout(tmp_path):
    measured, planned, shape, settings = saved_by_one_block(tmp_path, "llama", torch.bfloat16, 0.1, False)
    # On the CPU dropout keeps its mask in the input dtype; CUDA (which the planner counts) keeps bool.
    inputs = sum(linear.in_features for linear in adapted_linears(shape, "all") if linear.layer == 0)
    assert measured == planned + settings.tokens * inputs * (settings.compute_bytes - 1)


def test_training_step_peak_matches_the_planner(tmp_path):
    """Two full steps of a small random NF4 model: the tracker's peak against the planner's bytes."""
    config = tiny_config("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=8000)
    shape = shape_from_model(meta_model(config), config)
    with LiveTensorBytes() as tracker:
        model = random_quantized_model(config, torch.float32, CPU).train()
        enable_gradient_checkpointing(model)
        model = add_lora(model, LoraArguments(lora_r=16, lora_dropout=0.0), torch.float32)
        batch = random_batch(2, 128, config.vocab_size, CPU)
        trained = int((batch["labels"][:, 1:] != -100).sum()) / batch["labels"].numel()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for chunk in (0, 64):
            set_loss_chunk_size(model, chunk)
            optimizer = build_optimizer(trainable, TrainArguments(optim="adamw_8bit"), CPU)
            tracker.reset_peak()
            for _ in range(2):
                batch_loss_sum(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            settings = PlanSettings(micro_batch_size=2, max_seq_length=128, lora_r=16, lora_dropout=0.0,
                                   optim="adamw_8bit", compute_dtype="float32", lora_dtype="float32",
                                   loss_chunk_size=chunk, offload_activations=False, trained_fraction=trained)
            _, planned = predicted(shape, settings, CPU)
            assert planned == pytest.approx(tracker.peak, rel=0.05), chunk
            del optimizer


@pytest.mark.gpu
def test_gpu_peak_within_ten_percent_of_the_plan():
    """The issue's target on a GPU: predicted reserved memory within 10% of max_memory_reserved."""
    from qlora_kit.bench.memory_measure import measure_model

    rows = measure_model("smollm2-135m-instruct", [1024], 1, torch.device("cuda"), steps=2)
    for row in rows:
        assert abs(row.error) <= 0.10, row
