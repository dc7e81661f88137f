"""Stops from outside, on the real recipe in a subprocess: SIGTERM, a second signal, SIGKILL mid-checkpoint, and
SIGINT/SIGTERM outside the training loop (tokenizing, exporting)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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


# Interrupts outside the training loop: one line, exit 128 + signal, no child process left running.

def conversations_file(folder: Path, copies: int = 20) -> Path:
    """20,000 synthetic conversations: a few seconds of tokenizing in two processes on a CPU."""
    from qlora_kit.bench.synthetic_data import synthetic_conversations, write_jsonl

    sample = write_jsonl(synthetic_conversations(1000, seed=3), folder / "sample.jsonl").read_text()
    path = folder / "chats.jsonl"
    path.write_text(sample * copies)
    return path


def lines_after(text: str) -> list[str]:
    """The message lines of some stderr text: progress-bar redraws left out."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip() and "%|" not in line]


def survivors(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def interrupt(out: Path, ready, sig: int, *extra: str, group: bool = False) -> tuple[int, str, list[psutil.Process]]:
    """Start the recipe, send `sig` once `ready(process)` holds; return the exit code, the stderr written after
    the signal, and the processes that were its children then and still run a second after it ended."""
    log = out.parent / f"{out.name}.stderr"
    process = subprocess.Popen([sys.executable, "-m", "qlora_kit.recipes.chat", *FLAGS, "--output_dir", str(out),
                                *extra], stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: ready(psutil.Process(process.pid)), process, out)
        children = psutil.Process(process.pid).children(recursive=True)
        offset = log.stat().st_size
        (os.killpg if group else os.kill)(process.pid, sig)  # the group: what Ctrl-C in a terminal does
        code = process.wait(timeout=300)
        time.sleep(1.0)
        return code, log.read_bytes()[offset:].decode(errors="replace"), survivors(children)
    finally:
        for child in survivors(children) + ([] if process.poll() is not None else [psutil.Process(process.pid)]):
            child.kill()


def tokenizing_in(processes: int):
    return lambda parent: len(parent.children(recursive=True)) >= processes + 1  # the workers and their manager


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "ctrl-c"])
def test_a_signal_while_tokenizing_in_two_processes_ends_the_workers_and_says_so(tmp_path, sig, group):
    data = conversations_file(tmp_path)
    out = tmp_path / "run"
    code, after, left = interrupt(out, tokenizing_in(2), sig, "--dataset_name", str(data), "--dataset_num_proc", "2",
                                  group=group)
    assert code == 128 + sig, after
    assert not left, f"{len(left)} child process(es) outlived the recipe"
    assert "Traceback" not in after and "Error" not in after, after
    assert lines_after(after) == [f"[qlora_kit] stopped by {signal.Signals(sig).name} while reading and tokenizing "
                                  f"the data; nothing was written: run the same command to start again"]
    assert not out.exists()


def test_ctrl_c_while_tokenizing_in_one_process_is_one_line(tmp_path):
    data = conversations_file(tmp_path)
    out = tmp_path / "run"
    code, after, left = interrupt(out, lambda parent: "tokenizing" in stderr_of(out), signal.SIGINT,
                                  "--dataset_name", str(data), "--dataset_num_proc", "1", group=True)
    assert code == 130 and not left and "Traceback" not in after, after
    assert len(lines_after(after)) == 1 and "stopped by SIGINT while reading and tokenizing" in after


def test_sigterm_while_the_recipe_exports_leaves_the_adapter_and_no_partial_folder(tmp_path):
    out = tmp_path / "run"
    code, after, left = interrupt(out, lambda parent: any(out.glob(".merged.partial-*/*.safetensors")),
                                  signal.SIGTERM, "--max_steps", "1", "--export_merged", "true")
    assert code == 143 and not left and "Traceback" not in after, after
    assert lines_after(after) == [f"[qlora_kit] stopped by SIGTERM while exporting the merged model; the adapter "
                                  f"in {out} is complete: export it with python tools/export_merged.py --adapter_dir "
                                  f"{out} --output_dir {out / 'merged'}"]
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "merged").exists() and not list(out.glob(".merged*"))
