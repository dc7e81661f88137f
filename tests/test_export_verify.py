"""End to end on the real demo model: the recipe exports and verifies; an nf4 merge sits at the noise floor."""

import json
from pathlib import Path

import bitsandbytes
import bitsandbytes.nn.modules
import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_kit.config import parse
from qlora_kit.export.cli import main as export_main
from qlora_kit.recipes.chat import run

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, demo_model_dir):
    out = tmp_path_factory.mktemp("export-e2e") / "run"
    argv = ["--config", str(ROOT / "recipes/chat/demo.yaml"), "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--eval_fraction", "0.02",
            "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "3",
            "--export_merged", "true", "--export_verify", "true"]
    return run(parse(argv)).run_dir


def test_the_recipe_writes_a_merged_model_that_stays_within_the_noise_floor(exported_run):
    merged = exported_run / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "merge_report.json"):
        assert (merged / name).is_file(), name
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["merge_base"] == "nf4" and report["dtype"] == "bfloat16"
    assert report["within_noise_floor"], report
    assert report["merged_vs_adapter"]["positions"] > 100
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.tie_word_embeddings and "quantization_config" not in model.config.to_dict()


@pytest.mark.parametrize("cpu_has_avx512_bf16", [False, True])
def test_merging_into_the_original_weights_drifts_past_the_floor(exported_run, tmp_path, monkeypatch,
                                                                  cpu_has_avx512_bf16):
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: cpu_has_avx512_bf16)
    out = tmp_path / "original"
    export_main(["--adapter_dir", str(exported_run), "--output_dir", str(out), "--merge_base", "original",
                 "--verify", "true"])
    drifted = json.loads((out / "merge_report.json").read_text())
    nf4 = json.loads((exported_run / "merged" / "merge_report.json").read_text())
    assert drifted["floor_valid"] and not drifted["within_noise_floor"], drifted
    assert drifted["merged_vs_adapter"]["mean_abs_logit_diff"] > 3 * nf4["merged_vs_adapter"]["mean_abs_logit_diff"]
    assert drifted["merged_vs_adapter"]["top1_agreement"] < nf4["merged_vs_adapter"]["top1_agreement"]


def test_a_floor_from_a_kernel_that_computes_something_else_is_reported_invalid(exported_run, tmp_path, monkeypatch,
                                                                               capsys):
    """A 4-bit kernel reading its weights in the wrong layout (as bitsandbytes' repacked CPU path once was):
    its outputs come out in another order. The floor is then garbage, and no merge may pass against it."""
    matmul_4bit = bitsandbytes.matmul_4bit

    def wrong_layout(A, B, quant_state=None, **kwargs):
        out = matmul_4bit(A, B, quant_state=quant_state, **kwargs)
        return out.roll(1, dims=-1)

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", wrong_layout)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--adapter_dir", str(exported_run), "--output_dir", str(out), "--verify", "true"])
    assert exit_info.value.code == 1
    report = json.loads((out / "merge_report.json").read_text())
    assert not report["floor_valid"] and not report["within_noise_floor"]
    assert report["floor_check"]["adapter_vs_float32"]["top1_agreement"] < 0.5
    err = capsys.readouterr().err
    assert "could not measure a noise floor" in err and "within the noise floor" not in err


def test_the_floor_check_passes_dtype_rounding_and_fails_garbage():
    from qlora_kit.export.verify import agrees_as_rounding_does

    torch.manual_seed(0)
    reference = torch.randn(200, 1000) * 8
    assert agrees_as_rounding_does(reference.bfloat16().float(), reference)
    assert not agrees_as_rounding_does(torch.randn(200, 1000) * 8, reference)
    assert not agrees_as_rounding_does(reference.roll(1, dims=-1), reference)
