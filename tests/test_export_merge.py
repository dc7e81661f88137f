"""The merged model computes what the adapter model computed: NF4 base bit for bit, LoRA/DoRA by peft's formulas."""

import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from export_runs import CPU, make_run
from qlora_kit.config import ModelArguments
from qlora_kit.export.merge import MergeOptions, export_merged
from qlora_kit.export.nf4 import nf4_round_trip
from qlora_kit.model.load import load_quantized_model
from tiny_models import save_tiny_model

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def merge(run, out, **options):
    export_merged(MergeOptions(adapter_dir=run, output_dir=out, **options))
    return out


@pytest.mark.parametrize("architecture, compute_dtype", [
    ("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32), ("phi3", torch.bfloat16)])
@pytest.mark.parametrize("chunk_elements", [64 * 3, 1 << 24])  # quantized a few blocks at a time, or whole
def test_nf4_base_is_bit_for_bit_what_the_loaded_4bit_layers_hold(tmp_path, architecture, compute_dtype,
                                                                  chunk_elements):
    folder = save_tiny_model(tmp_path / architecture, architecture)
    model = load_quantized_model(folder, ModelArguments(model_name_or_path=str(folder)), compute_dtype, CPU)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert layers
    with safe_open(str(folder / "model.safetensors"), framework="pt") as checkpoint:
        for name, layer in layers.items():
            loaded = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            conv1d = architecture == "gpt2"
            ours = nf4_round_trip(checkpoint.get_tensor(name + ".weight"), compute_dtype, True, conv1d, CPU,
                                  chunk_elements)
            assert torch.equal(ours.T if conv1d else ours, loaded), name


@pytest.mark.parametrize("architecture, lora", [
    ("llama", {}),
    ("qwen2", {}),  # biases on q, k, v
    ("phi3", {}),  # fused qkv_proj and gate_up_proj
    ("gpt2", {}),  # Conv1D weights stored [in, out]
    ("llama", {"use_dora": True, "use_rslora": True}),
    ("gpt2", {"use_dora": True}),
])
def test_merged_logits_equal_the_adapter_models_in_fp32(tmp_path, architecture, lora):
    base, run, adapted = make_run(tmp_path, architecture, compute_dtype=torch.float32, **lora)
    merged = AutoModelForCausalLM.from_pretrained(merge(run, tmp_path / "merged", dtype=torch.float32)).eval()
    expected = logits(adapted)
    with adapted.disable_adapter():
        assert (logits(adapted) - expected).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=2e-5)


def test_original_base_is_w0_plus_scaled_delta_exactly_in_fp32(tmp_path):
    base, run, _ = make_run(tmp_path, "llama", base_dtype=torch.float32, lora_r=4, lora_alpha=8)
    merged = load_file(merge(run, tmp_path / "merged", merge_base="original", dtype=torch.float32) / "model.safetensors")
    original = load_file(base / "model.safetensors")
    adapter = load_file(run / "adapter_model.safetensors")
    projection = "model.layers.1.mlp.down_proj"
    a = adapter[f"base_model.model.{projection}.lora_A.weight"]
    b = adapter[f"base_model.model.{projection}.lora_B.weight"]
    assert torch.equal(merged[projection + ".weight"], original[projection + ".weight"] + (b @ a) * (8 / 4))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], original[name]), name


def test_nf4_and_original_bases_differ_by_the_quantization_error(tmp_path):
    base, run, _ = make_run(tmp_path, "llama", compute_dtype=torch.float32)
    nf4 = load_file(merge(run, tmp_path / "nf4", dtype=torch.float32) / "model.safetensors")
    original = load_file(merge(run, tmp_path / "original", merge_base="original", dtype=torch.float32)
                         / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    error = (nf4[name] - original[name]).abs()
    assert 0 < error.mean() < original[name].abs().mean() / 4  # NF4 rounding: present, and small


@pytest.mark.parametrize("targets, tied_after", [("q_proj,v_proj", True), ("q_proj,embed_tokens,lm_head", False)])
def test_tied_embeddings(tmp_path, targets, tied_after):
    base, run, adapted = make_run(tmp_path, "llama", model_overrides={"tie_word_embeddings": True},
                                      lora_target_modules=targets)
    out = merge(run, tmp_path / "merged", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied_after
    with safe_open(str(out / "model.safetensors"), framework="pt") as shard:
        assert ("lm_head.weight" in shard.keys()) is not tied_after
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=0, atol=2e-5)


def test_sharded_bf16_output_is_an_ordinary_model_folder(tmp_path, demo_tokenizer):
    base, run, adapted = make_run(tmp_path, "llama", tokenizer=demo_tokenizer)
    out = merge(run, tmp_path / "merged", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and not getattr(merged, "is_quantized", False)
    with torch.no_grad():
        diff = (merged.float()(input_ids=IDS).logits - logits(adapted)).abs().mean()
    assert diff < 0.05  # bf16 rounding of the merged weights only


@pytest.mark.gpu
def test_nf4_base_on_cuda_is_bit_for_bit_what_the_loaded_4bit_layers_hold(tmp_path):
    from qlora_kit.export.nf4 import compare_with_loader

    folder = save_tiny_model(tmp_path / "llama", "llama")
    result = compare_with_loader(folder, torch.bfloat16, True, torch.device("cuda"))
    assert result["layers"] == result["equal"] > 0
