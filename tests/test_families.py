"""Every supported family, from a tiny random config: its facts hold, NF4 + LoRA on every projection
(fused ones too), the chunked loss equals the model's own, streaming and layer-major order change
nothing, a resumed run is bit-identical to a straight one, and --verify passes a correct merge and flags a
wrong one."""

import json
from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch

from qlora_kit.config import LoraArguments, TrainArguments
from qlora_kit.export.cli import main as export_main
from qlora_kit.memory.reorder import LayerMajorStep
from qlora_kit.model.family import (FAMILIES, check_structure, family_of, replaced_forwards, set_checkpoint_function,
                                     sliding_window_layers)
from qlora_kit.train.loss import check_chunked_loss, logit_head, set_loss_chunk_size
from qlora_kit.bench.resilience import compare_runs, synthetic_dataset, train_once
from export_runs import make_run
from stream_models import CPU, lora_model, one_thread  # noqa: F401 - one_thread is an autouse fixture
from test_stream_reorder import lora_grads, micro_batches, plain_step
from tiny_models import VOCAB, FAMILY_ARCHITECTURES, save_tiny_model, tiny_chat_tokenizer, tiny_config, tiny_model

LAYERS = 3
FAMILIES_TESTED = sorted(FAMILY_ARCHITECTURES)


def test_every_family_has_a_tiny_model():
    assert {tiny_config(a).model_type for a in FAMILY_ARCHITECTURES} == set(FAMILIES)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES_TESTED)
def family_run(request, tmp_path_factory, tokenizer):
    """A tiny base of the family and a trained-looking run, with a tokenizer for --verify's chats."""
    overrides = dict(FAMILY_ARCHITECTURES[request.param], num_hidden_layers=LAYERS)
    folder = tmp_path_factory.mktemp(request.param)
    base, run, model = make_run(folder, request.param, tokenizer=tokenizer, model_overrides=overrides)
    return request.param, base, run, model


@pytest.mark.parametrize("architecture", FAMILIES_TESTED)
def test_the_facts_hold_for_the_model_transformers_builds(architecture):
    model = tiny_model(architecture, **FAMILY_ARCHITECTURES[architecture])
    family = family_of(model)
    check_structure(model, family)
    head = logit_head(model)
    steps = {"multiply": head.multiply, "divide": head.divide, "softcap": head.softcap}
    assert {k: v for k, v in steps.items() if v is not None} == family.logit_steps(model.config)
    ids = torch.tensor([[5, 9, 17]])
    with torch.no_grad():
        ratio = model.get_input_embeddings()(ids) / model.get_input_embeddings().weight[ids]
        assert torch.allclose(ratio, torch.tensor(model.config.hidden_size ** 0.5 if family.embedding_scale else 1.0))
        norm = model.get_submodule(family.final_norm)
        for parameter in norm.parameters():
            parameter.zero_()
        assert bool(norm(torch.randn(1, 3, model.config.hidden_size)).abs().sum() > 0) == family.norm_plus_one
    sliding = sliding_window_layers(model.config)
    assert bool(sliding) == architecture.startswith("gemma")


def test_nf4_with_lora_on_every_projection(family_run):
    architecture, _, _, model = family_run
    family = family_of(model)
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit)}
    assert adapted == {f"{family.layers}.{i}.{p}" for i in range(LAYERS) for p in family.projections}
    assert all(any(name.endswith(fused) for name in adapted) for fused in family.fused)


def test_chunked_loss_equals_the_models_own(family_run):
    """Fails loudly when a transformers release changes what a supported family's head does."""
    _, _, _, model = family_run
    set_loss_chunk_size(model, 5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 20), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    chunked, own = check_chunked_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    assert abs(chunked - own) < 1e-4 * own


def test_streamed_and_layer_major_equal_plain(family_run):
    _, base, _, _ = family_run
    batches = [{k: v.clamp(max=VOCAB - 1) if k == "input_ids" else v for k, v in b.items()} for b in micro_batches(2)]
    step_trained = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
    plain, _ = lora_model(base)
    streamed, streamer = lora_model(base, resident_layers=1)
    loss_plain = plain_step(plain, batches, step_trained)
    loss_reordered = LayerMajorStep(streamed, streamer, CPU)(batches, step_trained)
    torch.testing.assert_close(loss_reordered, loss_plain, rtol=1e-6, atol=0)
    grads_plain, grads_reordered = lora_grads(plain), lora_grads(streamed)
    assert grads_plain.keys() == grads_reordered.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_reordered[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_verify_passes_a_correct_merge_and_flags_one_into_the_original_weights(family_run, tmp_path):
    _, _, run, _ = family_run
    reports = {}
    for merge_base in ("nf4", "original"):
        export_main(["--adapter_dir", str(run), "--output_dir", str(tmp_path / merge_base), "--merge_base", merge_base,
                     "--verify", "true"])
        reports[merge_base] = json.loads((tmp_path / merge_base / "merge_report.json").read_text())
    correct, wrong = reports["nf4"], reports["original"]
    assert correct["floor_valid"] and correct["within_noise_floor"], correct
    assert correct["noise_floor"]["top1_agreement"] >= 0.9  # a sane floor: rounding, not noise
    assert wrong["floor_valid"] and not wrong["within_noise_floor"], wrong


def test_the_layer_wrappers_check_and_give_back():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    layer = model.model.layers[0]
    calls = []
    previous = set_checkpoint_function(layer, lambda run, *args: calls.append(1) or run(*args))
    model.train()(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == [1]
    set_checkpoint_function(layer, previous)
    del layer._gradient_checkpointing_func  # as a transformers release that checkpoints another way
    with pytest.raises(RuntimeError, match="checkpoints layers another way"):
        set_checkpoint_function(layer, previous)
    layers = model.model.layers
    with replaced_forwards(layers, lambda index: lambda hidden, *args, **kwargs: hidden + index):
        assert torch.equal(layers[1](torch.zeros(1)), torch.ones(1))
        with pytest.raises(RuntimeError, match="already has its forward replaced"):
            with replaced_forwards(layers, lambda index: None):
                pass
    assert "forward" not in vars(layers[1]) and "forward" not in vars(layers[0])


@pytest.mark.parametrize("architecture", FAMILIES_TESTED)
def test_a_resumed_run_is_bit_identical_to_a_straight_one(architecture, tmp_path):
    """Dropout, gradient checkpointing, accumulation and warmup; stopped at step 2 of 4 and resumed."""
    overrides = dict(FAMILY_ARCHITECTURES[architecture], num_hidden_layers=2)
    model_dir = save_tiny_model(tmp_path / "model", architecture, **overrides)
    data = synthetic_dataset(16, 32, VOCAB)
    lora = LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.1)
    args = TrainArguments(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                          warmup_ratio=0.25, logging_steps=1, save_steps=2, optim="adamw_torch")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_once(model_dir, data, replace(args, output_dir=str(straight)), lora, CPU)
    train_once(model_dir, data, replace(args, output_dir=str(resumed)), lora, CPU,
               resume_dir=straight / "checkpoints" / "step-2")
    comparison = compare_runs(straight, resumed, 4)
    assert comparison["steps_compared"] == [1, 2, 3, 4] and comparison["losses_identical"], comparison
    assert comparison["adapter_model_bytes_identical"] and comparison["optimizer_bytes_identical"], comparison
