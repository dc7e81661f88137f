"""The chat recipe end to end on the real demo model (SmolLM2-135M-Instruct) and chatterbot data."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from qlora_kit.config import parse
from qlora_kit.data.dataset import build_datasets
from qlora_kit.model.load import load_quantized_model
from qlora_kit.recipes.chat import run
from qlora_kit.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_model_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    argv = ["--config", str(ROOT / "recipes/chat/demo.yaml"), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--eval_fraction", "0.02", "--eval_steps", "0", "--save_steps", "15", "--logging_steps", "5"]
    config = parse(argv)
    return config, run(config)


def test_output_folder_holds_what_the_design_lists(demo_run):
    config, result = demo_run
    out = result.run_dir
    for name in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "run_config.yaml", "metrics.jsonl", "loss.png"]:
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-30"]
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["lora_r"] == 8 and run_config["max_steps"] == STEPS
    assert Path(run_config["resolved"]["base_model_dir"], "config.json").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30]


def test_adapter_reloads_with_peft_and_gives_the_same_logits(demo_run, demo_model_dir):
    config, result = demo_run
    base = load_quantized_model(demo_model_dir, config.model, torch.float32, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base, result.run_dir).eval()
    trained = result.model.eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2, 198, 28, 9113]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_held_out_loss_falls(demo_run, demo_model_dir, demo_tokenizer):
    config, result = demo_run
    _, eval_data, _ = build_datasets(config.data, demo_tokenizer, config.train.seed)
    base = load_quantized_model(demo_model_dir, config.model, torch.float32, torch.device("cpu"))
    before = evaluate(base, eval_data, 8, demo_tokenizer.pad_token_id, torch.device("cpu"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert after < before - 0.2, (before, after)
