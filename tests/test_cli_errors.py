"""Every mistake a user can make on the command line: one line, exit code 2, nothing written."""

import subprocess
import sys

import pytest

from tiny_models import BROKEN_MODELS


def run_recipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qlora_kit.recipes.chat", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


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
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make_args, expected):
    out = tmp_path / "out"
    result = run_recipe(*make_args(tmp_path), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert not out.exists()


def test_unknown_yaml_field(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1.0e-4\nbatch_size: 4\n")
    result = run_recipe("--config", str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "unknown field(s) in")
    assert "batch_size" in result.stderr and not (tmp_path / "out").exists()


def test_output_folder_with_an_earlier_run_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.yaml").write_text("lora_r: 8\n")
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    result = run_recipe("--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, "holds an earlier run")
    assert "--overwrite_output_dir" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "run_config.yaml"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_missing_dataset(tmp_path, demo_model_dir):
    out = tmp_path / "out"
    result = run_recipe("--dataset_name", str(tmp_path / "chats.jsonl"), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("break_model", BROKEN_MODELS)
def test_a_broken_model_folder_is_one_line_before_anything_loads(tmp_path, break_model):
    model = tmp_path / "model"
    expected = break_model(model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = tmp_path / "out"
    result = run_recipe("--model_name_or_path", str(model), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert not out.exists() and {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_an_output_dir_under_a_file_is_refused_before_the_model_is_looked_at(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "run"
    result = run_recipe("--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, f"--output_dir {out} cannot be created: {tmp_path / 'notes.txt'} is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
