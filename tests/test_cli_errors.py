"""Every mistake a user can make on the command line: one line, exit code 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import run_main
from tiny_models import BROKEN_MODELS, save_tiny_model
from qlora_kit.recipes.chat import main


@pytest.fixture
def run_recipe(capsys):
    """The recipe's command line, run in this process."""
    return lambda *args, cwd: run_main(main, capsys, *args, cwd=cwd)


def assert_one_line_error(result, expected):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("make_args, expected", [
    (lambda tmp: ["--model_name_or_path", str(tmp / "no" / "such" / "model")], "does not exist"),
    (lambda tmp: ["--model_name_or_path", str(tmp)], "has no config.json"),
    (lambda tmp: ["--lora_r", "0"], "--lora_r must be a positive integer"),
    (lambda tmp: ["--lora_rank", "8"], "unknown argument(s): --lora_rank"),
    (lambda tmp: ["--config", str(tmp / "missing.yaml")], "does not exist"),
    (lambda tmp: ["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (lambda tmp: ["--learning_rate", "-1e-4"], "--learning_rate must be in (0, 1]"),
    (lambda tmp: ["--eval_fraction", "0.99"], "--eval_fraction must be in [0, 0.5]"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_recipe, tmp_path, make_args, expected):
    out = tmp_path / "out"
    result = run_recipe(*make_args(tmp_path), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert not out.exists()


def test_a_damaged_gguf_model_file_is_one_line(run_recipe, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    result = run_recipe("--model_name_or_path", str(tmp_path / "model.gguf"), "--output_dir", str(tmp_path / "out"),
                        cwd=tmp_path)
    assert_one_line_error(result, f"model file {tmp_path / 'model.gguf'} is not a readable GGUF file")
    assert not (tmp_path / "out").exists()


def test_unknown_yaml_field(run_recipe, tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1.0e-4\nbatch_size: 4\n")
    result = run_recipe("--config", str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "unknown field(s) in")
    assert "batch_size" in result.stderr and not (tmp_path / "out").exists()


def test_output_folder_with_an_earlier_run_is_refused_and_left_alone(run_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text("lora_r: 8\n")
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    result = run_recipe("--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, "holds an earlier run")
    assert "--overwrite_output_dir" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "run_config.yaml"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_missing_dataset(run_recipe, tmp_path, demo_model_dir):
    out = tmp_path / "out"
    result = run_recipe("--dataset_name", str(tmp_path / "chats.jsonl"), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, "does not exist")
    assert not out.exists()


# --- the output folder: never lose what the run did not write --------------------------------

CHATS = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
         for i in range(8)]
SHORT_RUN = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--max_seq_length", "64", "--eval_fraction", "0",
             "--lora_r", "2", "--gpu_memory", "none"]


def earlier_run(out):
    """A folder holding an earlier run and, beside it, things the run did not write: notes, samples, its data."""
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "adapter_model.safetensors").write_bytes(b"old")
    for name in ("run_config.yaml", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (out / name).write_text("old")
    (out / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model card\n")
    (out / "notes.txt").write_text("my notes")
    (out / "samples").mkdir()
    (out / "samples" / "reply.txt").write_text("a sample")
    data = out / "data" / "chats.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(chat) + "\n" for chat in CHATS))
    return data


def test_overwrite_removes_only_the_runs_own_files(run_recipe, tmp_path, demo_model_dir):
    out = tmp_path / "out"
    data = earlier_run(out)
    result = run_recipe("--dataset_name", str(data), "--output_dir", str(out), "--overwrite_output_dir", "true",
                        *SHORT_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "samples" / "reply.txt").read_text() == "a sample"
    assert data.read_text().count("\n") == len(CHATS)
    assert (out / "run_config.yaml").read_text() != "old" and (out / "adapter_model.safetensors").stat().st_size > 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert "removed the earlier run's files" in result.stderr and "checkpoints/" in result.stderr
    assert "kept what the run did not write: data/ (the run's data), notes.txt, samples/" in result.stderr


def test_a_run_folder_without_checkpoints_is_not_offered_a_resume(run_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text("lora_r: 8\n")  # as a run killed (twice Ctrl-C) before its first checkpoint
    result = run_recipe("--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, "holds an earlier run; it has no checkpoint to resume from")
    assert "--overwrite_output_dir true to start over" in result.stderr and "resume_from_checkpoint" not in result.stderr


@pytest.mark.parametrize("make_out, expected", [
    (lambda tmp: Path("/proc/qlora_kit_run"), "cannot write to --output_dir /proc/qlora_kit_run"),
    (lambda tmp: tmp / "a_file" / "run", "cannot be created"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(run_recipe, tmp_path, make_out, expected):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_recipe("--output_dir", str(make_out(tmp_path)), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert "loading" not in result.stderr.lower() and "disk space" not in result.stderr


@pytest.mark.parametrize("break_model", BROKEN_MODELS)
def test_a_broken_model_folder_is_one_line_before_anything_loads(run_recipe, tmp_path, break_model):
    model = tmp_path / "model"
    expected = break_model(model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = tmp_path / "out"
    result = run_recipe("--model_name_or_path", str(model), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert not out.exists() and {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_model_folder_without_a_tokenizer_is_one_line_and_writes_nothing(run_recipe, tmp_path):
    model = save_tiny_model(tmp_path / "model")  # config and weights, no tokenizer files
    out = tmp_path / "out"
    result = run_recipe("--model_name_or_path", str(model), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, f"{model} holds no tokenizer files: copy those of its model (tokenizer.json, "
                                  f"tokenizer_config.json) into it")
    assert not out.exists()


def test_an_output_dir_under_a_file_is_refused_before_the_model_is_looked_at(run_recipe, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "run"
    result = run_recipe("--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, f"--output_dir {out} cannot be created: {tmp_path / 'notes.txt'} is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_real_command_line_exits_2_with_one_line(tmp_path):
    """The tests above call main() in-process; this one starts `python -m qlora_kit.recipes.chat` itself."""
    result = subprocess.run([sys.executable, "-m", "qlora_kit.recipes.chat", "--learning_rate", "inf", "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert_one_line_error(result, "--learning_rate must be a finite number, got inf")
    assert not (tmp_path / "out").exists()
