"""Exact resume: a run resumed from step k matches the run that never stopped; incompatible resumes are refused."""

import dataclasses
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli import run_main
from qlora_kit.config import LoraArguments, TrainArguments, parse
from qlora_kit.data.dataset import build_datasets
from qlora_kit.errors import UserError
from qlora_kit.fingerprint import config_fingerprint
from qlora_kit.output import check_resume, resume_differences, run_identity
from qlora_kit.recipes.chat import main, run
from qlora_kit.train.metrics import MetricsLog
from qlora_kit.bench.resilience import check_exact_resume, synthetic_dataset, train_once, write_random_llama

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def assert_identical(comparison):
    assert comparison["steps_compared"] and comparison["losses_identical"], comparison
    assert comparison["adapter_model_bytes_identical"] and comparison["optimizer_bytes_identical"], comparison


@pytest.mark.parametrize("optim, logging_steps", [("paged_adamw_8bit", 2), ("adamw_torch", 1)])
def test_tiny_model_resume_is_bit_exact(tmp_path, optim, logging_steps):
    """Dropout, gradient checkpointing, accumulation, warmup + cosine; stopped mid logging window for logging 2."""
    report = check_exact_resume(tmp_path, size="tiny", steps=6, stop_at=3, optim=optim, device=CPU,
                                noise_floor=False, logging_steps=logging_steps)
    assert_identical(report["resumed_vs_straight"])
    assert report["resumed_vs_straight"]["steps_compared"] == list(range(logging_steps, 7, logging_steps))


def test_a_changed_learning_rate_applies_from_the_resumed_step(tmp_path):
    model_dir = write_random_llama(tmp_path / "model", "tiny")
    data = synthetic_dataset(32, 32, 512)
    args = TrainArguments(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, warmup_ratio=0.2,
                          logging_steps=1, save_steps=2, optim="paged_adamw_8bit")
    lora = LoraArguments(lora_r=8, lora_alpha=16)
    train_once(model_dir, data, replace(args, output_dir=str(tmp_path / "straight")), lora, CPU)
    train_once(model_dir, data, replace(args, output_dir=str(tmp_path / "slower"), learning_rate=5e-4), lora, CPU,
               resume_dir=tmp_path / "straight" / "checkpoints" / "step-2")
    straight = {r["step"]: r["learning_rate"] for r in MetricsLog(tmp_path / "straight" / "metrics.jsonl").rows()}
    slower = {r["step"]: r["learning_rate"] for r in MetricsLog(tmp_path / "slower" / "metrics.jsonl").rows()}
    assert slower[2] == straight[2] and slower[3] == pytest.approx(straight[3] / 2, rel=1e-12) and slower[3] > 0


# ---------------------------------------------------------------- the real demo model through the recipe

DEMO_FLAGS = ["--config", str(ROOT / "recipes/chat/demo.yaml"), "--max_steps", "6", "--per_device_train_batch_size",
              "2", "--max_seq_length", "64", "--eval_fraction", "0", "--logging_steps", "1", "--save_steps", "3",
              "--lora_dropout", "0.1", "--warmup_ratio", "0.2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_model_dir):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(parse(DEMO_FLAGS + ["--output_dir", str(out)]))
    return out


@pytest.mark.slow
def test_demo_model_resumed_at_step_3_matches_the_straight_run(straight_run, tmp_path):
    resumed = tmp_path / "resumed"
    run(parse(DEMO_FLAGS + ["--output_dir", str(resumed),
                            "--resume_from_checkpoint", str(straight_run / "checkpoints" / "step-3")]))
    losses = {r["step"]: r["loss"] for r in MetricsLog(straight_run / "metrics.jsonl").rows()}
    again = {r["step"]: r["loss"] for r in MetricsLog(resumed / "metrics.jsonl").rows()}
    assert list(losses) == list(again) == [1, 2, 3, 4, 5, 6]
    assert again == losses  # to the last bit
    assert (resumed / "adapter_model.safetensors").read_bytes() == (straight_run / "adapter_model.safetensors").read_bytes()
    for name in ("optimizer.safetensors", "rng.safetensors"):
        assert (resumed / "checkpoints/step-6" / name).read_bytes() == (straight_run / "checkpoints/step-6" / name).read_bytes()


@pytest.mark.slow
def test_a_packed_run_resumed_at_step_2_matches_the_straight_run(tmp_path, demo_model_dir):
    flags = DEMO_FLAGS + ["--packing", "true", "--max_steps", "4", "--save_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(parse(flags + ["--output_dir", str(straight)]))
    run(parse(flags + ["--output_dir", str(resumed),
                       "--resume_from_checkpoint", str(straight / "checkpoints" / "step-2")]))
    losses = {r["step"]: r["loss"] for r in MetricsLog(straight / "metrics.jsonl").rows()}
    again = {r["step"]: r["loss"] for r in MetricsLog(resumed / "metrics.jsonl").rows()}
    assert list(again) == [1, 2, 3, 4] and again == losses  # to the last bit
    assert (resumed / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def demo_identity(straight_run, demo_model_dir, demo_tokenizer):
    identities = {}

    def identity_for(flags):
        config = parse(DEMO_FLAGS + ["--output_dir", str(straight_run)] + flags)
        key = (str(config.data), config.train.seed)
        if key not in identities:
            train_data, _, _ = build_datasets(config.data, demo_tokenizer, config.train.seed)
            identities[key] = run_identity(demo_model_dir, train_data, demo_tokenizer.pad_token_id)
        return config, identities[key]

    return identity_for


def test_harmless_changes_are_allowed_and_listed(straight_run, demo_identity):
    config, identity = demo_identity(["--max_steps", "10", "--logging_steps", "5", "--learning_rate", "1e-4"])
    check_resume(straight_run / "checkpoints" / "step-6", config, identity)
    saved = yaml.safe_load((straight_run / "checkpoints/step-6/run_config.yaml").read_text())
    refused, allowed = resume_differences(saved, config, identity)
    assert refused == [] and set(allowed) == {"max_steps 6 -> 10", "logging_steps 1 -> 5", "learning_rate 0.0005 -> 0.0001"}


@pytest.mark.parametrize("flags, expected", [
    (["--lora_r", "16"], "lora_r 8 -> 16 (the LoRA shape)"),
    (["--max_seq_length", "48"], "the training tokens differ (max_seq_length 64 -> 48)"),
    (["--packing", "true"], "the training tokens differ (packing False -> True)"),
    (["--seed", "7"], "seed 42 -> 7 (the data order)"),
    (["--per_device_train_batch_size", "4"], "per_device_train_batch_size 2 -> 4"),
    (["--optim", "adamw_torch"], "optim 'paged_adamw_8bit' -> 'adamw_torch'"),
])
def test_a_resume_that_changes_what_the_checkpoint_means_is_refused(straight_run, demo_identity, flags, expected):
    config, identity = demo_identity(flags)
    with pytest.raises(UserError, match="cannot resume from") as refused:
        check_resume(straight_run / "checkpoints" / "step-6", config, identity)
    assert expected in str(refused.value)


def test_a_changed_base_model_is_refused(straight_run, demo_identity, tmp_path):
    config, identity = demo_identity([])
    other = write_random_llama(tmp_path / "other", "tiny")
    changed = {**identity, **{"model_fingerprint": run_identity(other, _one_row(), 0)["model_fingerprint"]}}
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, model_name_or_path=str(other)))
    with pytest.raises(UserError, match="the base model differs"):
        check_resume(straight_run / "checkpoints" / "step-6", config, changed)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory, demo_model_dir):
    """The demo model's folder, config.json and tokenizer as they are, with other weights."""
    other = shutil.copytree(demo_model_dir, tmp_path_factory.mktemp("other") / "model")
    tensors = load_file(other / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        tensors[name] = (tensor.float() + 0.02 * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    return other


def test_same_config_other_weights_is_refused(straight_run, demo_identity, other_weights):
    config, identity = demo_identity([])
    changed = {**identity, "model_fingerprint": run_identity(other_weights, _one_row(), 0)["model_fingerprint"]}
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, model_name_or_path=str(other_weights)))
    with pytest.raises(UserError, match="the base model differs") as refused:
        check_resume(straight_run / "checkpoints" / "step-6", config, changed)
    assert f"the weights of {other_weights} are not those of" in str(refused.value)


def test_a_checkpoint_that_recorded_config_json_only_resumes_with_a_notice(straight_run, demo_identity, other_weights,
                                                                           tmp_path, monkeypatch):
    """Older checkpoints recorded config.json's fingerprint only: accepted, saying the weights are unchecked."""
    old = shutil.copytree(straight_run / "checkpoints" / "step-6", tmp_path / "step-6")
    saved = yaml.safe_load((old / "run_config.yaml").read_text())
    saved["resolved"]["model_fingerprint"] = config_fingerprint(other_weights)  # the demo's config.json, too
    (old / "run_config.yaml").write_text(yaml.safe_dump(saved))
    notices = []
    monkeypatch.setattr("qlora_kit.output.notice_once", notices.append)
    config, identity = demo_identity([])
    check_resume(old, config, identity)
    assert len(notices) == 1 and "config.json only" in notices[0] and "weights cannot be checked" in notices[0]
    saved["resolved"]["model_fingerprint"] = "0123456789abcdef"  # another config.json
    (old / "run_config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match="the base model differs"):
        check_resume(old, config, identity)


def test_the_command_line_refuses_a_base_with_other_weights_and_writes_nothing(straight_run, other_weights, capsys):
    before = {p: p.read_bytes() for p in straight_run.rglob("*") if p.is_file()}
    result = run_main(main, capsys, *DEMO_FLAGS, "--output_dir", str(straight_run), "--resume_from_checkpoint", "latest",
                      "--model_name_or_path", str(other_weights))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot resume from" in errors[0] and "the base model differs" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in straight_run.rglob("*") if p.is_file()} == before


def _one_row():
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}])


def test_the_command_line_refuses_and_writes_nothing(straight_run, capsys):
    before = {p: p.read_bytes() for p in straight_run.rglob("*") if p.is_file()}
    result = run_main(main, capsys, *DEMO_FLAGS, "--output_dir", str(straight_run), "--resume_from_checkpoint", "latest",
                      "--lora_r", "16")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot resume from" in errors[0] and "lora_r 8 -> 16" in errors[0]
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in straight_run.rglob("*") if p.is_file()} == before


@pytest.mark.gpu
def test_cuda_resume_with_the_paged_8bit_optimizer(tmp_path):
    """CUDA RNG, bf16, paged 8-bit AdamW. Where two straight runs agree bit for bit, so must the resumed one."""
    report = check_exact_resume(tmp_path, size="small", device=torch.device("cuda"), optim="paged_adamw_8bit")
    resumed, noise = report["resumed_vs_straight"], report["straight_vs_straight"]
    if noise["losses_identical"] and noise["adapter_model_bytes_identical"]:
        assert_identical(resumed)
    else:
        assert resumed["loss_max_abs_diff"] < 1e-2, report
    checks = ("paged_before", "guard_skip_keeps_state", "paged_after_load", "state_identical")
    assert report["paged_state_roundtrip"] == {name: True for name in checks}
    assert report["guard_device_syncs"] == "none"
