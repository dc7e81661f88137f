"""The recipe plans before loading: it refuses what cannot fit, warns on user settings that do not fit,
and applies the plan's loss chunk size and activation offload."""

import logging

import pytest
import torch

from cli import run_main
from qlora_kit.config import parse
from qlora_kit.errors import UserError
from qlora_kit.memory.apply import apply_memory_settings, plan_for_config, plan_for_run
from qlora_kit.memory.plan import GiB
from qlora_kit.recipes.chat import main
from qlora_kit.train.loss import LOSS_CHUNK_ATTRIBUTE
from tiny_models import save_tiny_model

CPU = torch.device("cpu")


def test_recipe_refuses_a_run_that_cannot_fit(tmp_path, demo_model_dir, capsys):
    out = tmp_path / "out"
    result = run_main(main, capsys, "--gpu_memory", "2GiB", "--max_seq_length", "4096", "--output_dir", str(out),
                      cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "8 x 4096 tokens does not fit" in errors[0] and "GPU memory" in errors[0]
    assert "--per_device_train_batch_size" in errors[0]  # what would fit instead
    assert "checkpointed hidden states" in result.stderr  # the budget table was printed first
    assert "Traceback" not in result.stderr and not out.exists()


def between_offload_and_not(folder):
    """A GPU size where the run fits only with activation offload."""
    base = ["--model_name_or_path", str(folder), "--max_seq_length", "2048", "--per_device_train_batch_size", "4"]
    kept = plan_for_config(parse(base + ["--offload_activations", "false"]), "float32", "float32", 1 << 50, 1 << 50)
    moved = plan_for_config(parse(base + ["--offload_activations", "true"]), "float32", "float32", 1 << 50, 1 << 50)
    assert moved.predicted_peak_gpu_bytes < kept.predicted_peak_gpu_bytes
    return base, (moved.predicted_peak_gpu_bytes + kept.predicted_peak_gpu_bytes) // 2


def test_a_user_setting_that_does_not_fit_is_kept_with_a_warning(tmp_path, said):
    folder = save_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=8, vocab_size=256)
    base, gpu = between_offload_and_not(folder)
    size = f"{gpu / GiB:.6f}GiB"
    chosen = plan_for_run(parse(base + ["--gpu_memory", size]), folder, CPU, torch.float32, torch.float32)
    assert chosen.fits and chosen.offload_activations  # the planner's own choice
    forced = plan_for_run(parse(base + ["--gpu_memory", size, "--offload_activations", "false"]), folder, CPU,
                          torch.float32, torch.float32)
    assert not forced.fits and not forced.offload_activations
    warnings = [r.getMessage() for r in said if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--offload_activations false" in warnings[0] and "offload_activations=true" in warnings[0]
    with pytest.raises(UserError, match="does not fit"):
        plan_for_run(parse(base + ["--gpu_memory", "1MiB"]), folder, CPU, torch.float32, torch.float32)


def test_no_plan_without_a_gpu_or_with_none(tmp_path):
    folder = save_tiny_model(tmp_path / "llama", "llama")
    assert plan_for_run(parse([]), folder, CPU, torch.float32, torch.float32) is None  # auto, no GPU
    assert plan_for_run(parse(["--gpu_memory", "none"]), folder, CPU, torch.float32, torch.float32) is None


def test_the_plan_is_applied_to_the_model(tmp_path):
    from qlora_kit.config import LoraArguments, ModelArguments
    from qlora_kit.model.load import load_quantized_model
    from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing

    folder = save_tiny_model(tmp_path / "llama", "llama", num_hidden_layers=8, vocab_size=256)
    base, gpu = between_offload_and_not(folder)
    config = parse(base + ["--gpu_memory", f"{gpu / GiB:.6f}GiB"])
    plan = plan_for_run(config, folder, CPU, torch.float32, torch.float32)
    model = load_quantized_model(folder, ModelArguments(), torch.float32, CPU)
    enable_gradient_checkpointing(model)
    model = add_lora(model, LoraArguments(), torch.float32)
    offloader = apply_memory_settings(model, config, plan, CPU)
    assert offloader is not None and getattr(model.get_base_model(), LOSS_CHUNK_ATTRIBUTE) == plan.loss_chunk_size
