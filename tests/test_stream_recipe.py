"""The chat recipe with streamed layers, layer-major accumulation and a quantized cache trains the
same adapter as the plain recipe (a tiny random Llama with the demo tokenizer, the demo data)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import parse
from qlora_kit.recipes.chat import run
from stream_models import one_thread  # noqa: F401 - one_thread is an autouse fixture
from tiny_models import save_tiny_model

pytestmark = pytest.mark.slow


def recipe(model_dir, out, *extra):
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--max_seq_length", "64",
            "--lora_dropout", "0", "--learning_rate", "1e-2", "--warmup_ratio", "0", "--eval_fraction", "0.01",
            "--logging_steps", "1", "--save_steps", "0", "--optim", "adamw_torch", "--eval_num_prompts", "0", *extra]
    return run(parse(argv))


def test_streamed_layer_major_run_trains_the_same_adapter(tmp_path, demo_model_dir):
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", num_hidden_layers=4, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_model_dir / name, model_dir / name)
    plain = recipe(model_dir, tmp_path / "plain")
    streamed = recipe(model_dir, tmp_path / "streamed", "--resident_layers", "1", "--layers_in_flight", "1",
                      "--quantized_cache", str(tmp_path / "nf4"))
    assert (tmp_path / "nf4" / "manifest.json").is_file()
    losses = [[json.loads(line).get("loss") for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
              for result in (plain, streamed)]
    assert len(losses[0]) == 3 and losses[0][:2] == pytest.approx(losses[1][:2], rel=1e-5)
    adapters = [load_file(result.run_dir / "adapter_model.safetensors") for result in (plain, streamed)]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 7 * 4
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
