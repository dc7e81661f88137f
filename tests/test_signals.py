"""Stops from outside, on the real recipe in a subprocess: SIGTERM, a second signal, and SIGKILL mid-checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.train.checkpoint import TEST_BLOCK_ENV, list_checkpoints, resolve_resume_dir, validate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--config", str(ROOT / "recipes/chat/demo.yaml"), "--max_steps", "30", "--per_device_train_batch_size", "2",
         "--max_seq_length", "64", "--eval_fraction", "0", "--logging_steps", "1", "--save_steps", "100"]

pytestmark = pytest.mark.slow


def start(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.stderr", "w")
    return subprocess.Popen([sys.executable, "-m", "qlora_kit.recipes.chat", *FLAGS, "--output_dir", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})


def stderr_of(out: Path) -> str:
    return (out.parent / f"{out.name}.stderr").read_text()


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for(condition, process: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{stderr_of(out)[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def resume(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit.recipes.chat", *FLAGS, "--output_dir", str(out),
                           "--resume_from_checkpoint", "latest", *extra], capture_output=True, text=True, timeout=900)


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = start(out)
    wait_for(lambda: logged_steps(out), process, out)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=600) == 128 + signal.SIGTERM
    stderr = stderr_of(out)
    stopped_at = logged_steps(out)[-1]
    assert 1 <= stopped_at < 30 and logged_steps(out) == list(range(1, stopped_at + 1))
    assert "SIGTERM received: finishing the current optimizer step" in stderr
    assert f"stopped by SIGTERM after step {stopped_at}" in stderr and "--resume_from_checkpoint latest" in stderr
    assert "Traceback" not in stderr
    assert [p.name for p in list_checkpoints(out)] == [f"step-{stopped_at}"]
    validate_checkpoint(out / "checkpoints" / f"step-{stopped_at}")

    finished = resume(out, "--max_steps", str(stopped_at + 1))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming with changed fields: max_steps 30 -> {stopped_at + 1}" in finished.stderr
    assert logged_steps(out) == list(range(1, stopped_at + 2))
    assert (out / "adapter_model.safetensors").is_file()


def test_a_second_signal_exits_at_once_and_leaves_the_checkpoints_whole(tmp_path):
    out = tmp_path / "run"
    process = start(out, "--save_steps", "1")
    wait_for(lambda: list_checkpoints(out), process, out)
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in stderr_of(out), process, out)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = stderr_of(out)
    assert "second SIGTERM: exiting now; the newest complete checkpoint is" in stderr
    assert "stopped by SIGTERM after step" not in stderr  # it did not wait for the step to end
    for folder in list_checkpoints(out):
        validate_checkpoint(folder)
    assert resolve_resume_dir("latest", out) == list_checkpoints(out)[-1]


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_usable(tmp_path):
    out = tmp_path / "run"
    process = start(out, "--save_steps", "1", "--max_steps", "3", env={TEST_BLOCK_ENV: "2"})
    half_written = out / "checkpoints" / ".tmp-step-2"
    wait_for(lambda: (half_written / "test-blocked").exists(), process, out)
    assert (half_written / "adapter_model.safetensors").is_file()  # the writer was part-way through
    process.kill()
    process.wait(timeout=60)
    assert [p.name for p in list_checkpoints(out)] == ["step-1"]
    assert resolve_resume_dir("latest", out) == out / "checkpoints" / "step-1"

    finished = resume(out, "--max_steps", "3", "--save_steps", "1")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert logged_steps(out) == [1, 2, 3]
