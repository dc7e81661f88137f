"""Ctrl-C and SIGTERM at any stage of an entry point: one line naming the stage, exit 130/143, no child left.

Each case runs a small entry point in a subprocess (signals and child processes of the test runner itself are
left alone); the real recipe and export are interrupted in test_signals.py and test_export_safety.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from qlora_kit.output import finish_run

ROOT = Path(__file__).resolve().parents[1]

ENTRY = """
import multiprocessing, os, signal, sys, time
from qlora_kit import interrupts
from qlora_kit.errors import UserError, exit_on_user_error

def sleep_forever():
    while True:
        time.sleep(0.1)

@exit_on_user_error
def main():
    interrupts.stage("loading the model", "nothing was written: run the same command to start again")
    {body}

main()
"""


def run_entry(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = ENTRY.format(body=textwrap.indent(textwrap.dedent(body), "    ").strip())
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)


def message_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_a_stage_is_one_line_with_the_conventional_exit_code(sig):
    result = run_entry(f"os.kill(os.getpid(), {int(sig)}); sleep_forever()")
    assert result.returncode == 128 + sig, result.stderr
    assert message_lines(result.stderr) == [f"[qlora_kit] stopped by {signal.Signals(sig).name} while loading the "
                                            f"model; nothing was written: run the same command to start again"]


def test_forked_children_are_ended_with_the_parent(tmp_path):
    pids = tmp_path / "pids"
    result = run_entry(f"""
        children = [multiprocessing.get_context("fork").Process(target=sleep_forever) for _ in range(2)]
        for child in children:
            child.start()
        open({str(pids)!r}, "w").write(" ".join(str(c.pid) for c in children))
        os.killpg(0, signal.SIGINT)  # Ctrl-C reaches the whole group: the children ignore it, the parent ends them
        sleep_forever()
    """)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert len(message_lines(result.stderr)) == 1
    time.sleep(0.5)
    alive = [int(p) for p in pids.read_text().split() if psutil.pid_exists(int(p))
             and psutil.Process(int(p)).status() != psutil.STATUS_ZOMBIE]
    assert not alive


def test_an_exception_raised_while_unwinding_from_a_signal_still_ends_as_the_signal():
    # datasets' pool answers an interrupted map with a TimeoutError of its own
    result = run_entry(f"""
        try:
            os.kill(os.getpid(), {int(signal.SIGTERM)})
            sleep_forever()
        finally:
            raise TimeoutError("from the pool")
    """)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr
    assert len(message_lines(result.stderr)) == 1


def test_a_user_error_is_still_exit_2():
    result = run_entry('raise UserError("--lora_r must be a positive integer")')
    assert result.returncode == 2 and message_lines(result.stderr) == ["error: --lora_r must be a positive integer"]


def test_an_interrupted_final_save_leaves_the_previous_adapter_and_no_temporary_folder(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"previous")

    class Model(torch.nn.Module):  # finite weights, whose save is interrupted halfway
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Parameter(torch.zeros(2, 2))

        def save_pretrained(self, folder):
            Path(folder).mkdir(exist_ok=True)  # as peft does: the folder may exist
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finish_run(tmp_path, Model())
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.safetensors"]
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"previous"
