"""Checkpoints on disk: manifest and validation, rotation, leftovers, disk space, a failed write."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from qlora_kit.config import LoraArguments, ModelArguments, TrainArguments
from qlora_kit.errors import UserError
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.lora import add_lora
from qlora_kit.train.checkpoint import (MANIFEST, CheckpointDamaged, TrainState, check_checkpoint_space, checkpoint_bytes,
                                        list_checkpoints, remove_leftovers, resolve_resume_dir, rotate_checkpoints,
                                        save_checkpoint, validate_checkpoint)
from qlora_kit.train.optim import build_optimizer, build_scheduler
from qlora_kit.bench.resilience import synthetic_dataset, train_once, write_random_llama, write_stepped_checkpoint

CPU = torch.device("cpu")
LORA = LoraArguments(lora_r=8, lora_alpha=16, lora_dropout=0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "model", "tiny")


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(16, 32, 512)


@pytest.fixture(scope="module")
def trained(tiny_dir, data, tmp_path_factory):
    """A tiny run of 2 steps with a checkpoint after each."""
    run = tmp_path_factory.mktemp("run") / "run"
    args = TrainArguments(output_dir=str(run), max_steps=2, per_device_train_batch_size=4, save_steps=1,
                          logging_steps=1, optim="adamw_8bit")
    train_once(tiny_dir, data, args, LORA, CPU)
    return run


def lora_model(tiny_dir, r=8):
    base = load_quantized_model(tiny_dir, ModelArguments(model_name_or_path=str(tiny_dir)), torch.float32, CPU)
    return add_lora(base, LoraArguments(lora_r=r), torch.float32)


def test_a_checkpoint_holds_every_state_and_a_manifest_of_them(trained):
    folder = trained / "checkpoints" / "step-2"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "optimizer.json",
            "scheduler.json", "rng.safetensors", "rng.json", "trainer_state.json", "metrics.jsonl",
            MANIFEST} <= names
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == names - {MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (folder / name).stat().st_size and len(entry["sha256"]) == 64
    state = TrainState.from_json((folder / "trainer_state.json").read_text())
    assert state.step == 2 and state.data.batch_in_epoch == 2 and state.trained_tokens > 0
    assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    validate_checkpoint(folder)


def test_the_adapter_in_a_checkpoint_loads_with_peft(trained, tiny_dir):
    base = load_quantized_model(tiny_dir, ModelArguments(model_name_or_path=str(tiny_dir)), torch.float32, CPU)
    model = PeftModel.from_pretrained(base, trained / "checkpoints" / "step-2")
    saved = load_file(trained / "checkpoints" / "step-2" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_a_damaged_checkpoint_is_refused_and_latest_falls_back(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damaged = run / "checkpoints" / "step-2" / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match="optimizer.safetensors does not match its SHA-256"):
        validate_checkpoint(damaged.parent)
    with pytest.raises(UserError, match="optimizer.safetensors"):
        resolve_resume_dir(str(damaged.parent), run)
    assert resolve_resume_dir("latest", run) == run / "checkpoints" / "step-1"
    (run / "checkpoints" / "step-1" / "rng.json").unlink()
    with pytest.raises(UserError, match="every checkpoint .* is damaged"):
        resolve_resume_dir("latest", run)


def test_a_missing_checkpoint_is_named_with_the_ones_there_are(trained, tmp_path):
    steps = trained / "checkpoints"
    with pytest.raises(UserError) as missing:
        resolve_resume_dir(str(steps / "step-9"), trained)
    message = str(missing.value)
    assert f"--resume_from_checkpoint {steps / 'step-9'} does not exist" in message and "manifest" not in message
    assert f"the complete checkpoints are: {steps / 'step-1'}, {steps / 'step-2'}" in message
    with pytest.raises(UserError, match=f"{tmp_path / 'empty' / 'checkpoints'} holds no complete checkpoint; start over "
                                        f"with --overwrite_output_dir true"):
        resolve_resume_dir("latest", tmp_path / "empty")


def test_rotation_keeps_the_newest_and_the_best(tiny_dir, tmp_path):
    model = lora_model(tiny_dir)
    args = TrainArguments(optim="adamw_8bit")
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], args, CPU)
    scheduler = build_scheduler(optimizer, args, 10)
    for step, eval_loss in zip(range(1, 6), [3.0, 1.0, 2.0, None, 5.0]):
        save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=step, eval_loss=eval_loss))
    assert rotate_checkpoints(tmp_path, keep_last=0, keep_best=True) == []
    rotate_checkpoints(tmp_path, keep_last=2, keep_best=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-4", "step-5"]
    rotate_checkpoints(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-5"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-5"]  # nothing hidden left


def test_leftovers_of_a_killed_writer_are_ignored_then_removed(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    half = run / "checkpoints" / ".tmp-step-3"
    shutil.copytree(run / "checkpoints" / "step-2", half)
    (half / "optimizer.safetensors").unlink()
    assert [p.name for p in list_checkpoints(run)] == ["step-1", "step-2"]
    remove_leftovers(run)
    assert not half.exists() and len(list_checkpoints(run)) == 2


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_torch", "paged_adamw_32bit"])
def test_the_size_estimate_matches_a_written_checkpoint(tiny_dir, tmp_path, optim):
    model = lora_model(tiny_dir, r=64)
    folder, _ = write_stepped_checkpoint(tmp_path, model, optim, CPU)
    written = sum(p.stat().st_size for p in folder.iterdir())
    assert abs(checkpoint_bytes(model, optim) - written) / written < 0.1, (checkpoint_bytes(model, optim), written)


def test_too_little_disk_space_is_refused_before_training(tiny_dir, tmp_path):
    model = lora_model(tiny_dir)
    check_checkpoint_space(tmp_path / "new" / "run", model, "paged_adamw_8bit")  # this disk has room for two
    with pytest.raises(UserError, match="not enough disk space for checkpoints"):
        check_checkpoint_space(tmp_path / "new" / "run", model, "paged_adamw_8bit", copies=10**12)


FAILING_WRITE = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from qlora_kit.config import LoraArguments, TrainArguments
    from qlora_kit.errors import exit_on_user_error
    from qlora_kit.bench.resilience import synthetic_dataset, train_once

    @exit_on_user_error
    def main(model_dir, run):
        data = synthetic_dataset(16, 32, 512)
        lora = LoraArguments(lora_r=8)
        args = dict(output_dir=run, per_device_train_batch_size=4, save_steps=1, optim="adamw_8bit")
        train_once(Path(model_dir), data, TrainArguments(max_steps=1, **args), lora, torch.device("cpu"))
        # From here on no file may grow past 16 kB: the kernel refuses the write (EFBIG), as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.RLIM_INFINITY))
        train_once(Path(model_dir), data, TrainArguments(max_steps=2, **args), lora, torch.device("cpu"),
                   resume_dir=Path(run) / "checkpoints" / "step-1")

    main(*sys.argv[1:])
""")


def test_a_failed_write_stops_training_and_keeps_the_earlier_checkpoint(tiny_dir, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(tiny_dir), str(run)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "step-2" in errors[0]
    assert "File too large" in errors[0] and "the earlier checkpoint step-1 is intact" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    validate_checkpoint(run / "checkpoints" / "step-1")
