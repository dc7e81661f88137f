"""End to end on the real demo model: the recipe exports and verifies; an nf4 merge sits at the noise floor."""

import json
from pathlib import Path

import pytest
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


def test_merging_into_the_original_weights_drifts_past_the_floor(exported_run, tmp_path):
    out = tmp_path / "original"
    export_main(["--adapter_dir", str(exported_run), "--output_dir", str(out), "--merge_base", "original",
                 "--verify", "true"])
    drifted = json.loads((out / "merge_report.json").read_text())
    nf4 = json.loads((exported_run / "merged" / "merge_report.json").read_text())
    assert not drifted["within_noise_floor"], drifted
    assert drifted["merged_vs_adapter"]["mean_abs_logit_diff"] > 3 * nf4["merged_vs_adapter"]["mean_abs_logit_diff"]
    assert drifted["merged_vs_adapter"]["top1_agreement"] < nf4["merged_vs_adapter"]["top1_agreement"]
