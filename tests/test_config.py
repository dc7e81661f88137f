import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.config import field_names, parse
from qlora_kit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "recipes" / "chat").glob("*.yaml"))  # recipes/accelerate/ holds accelerate's configs


def test_defaults_are_the_demo_model_and_data():
    config = parse([])
    assert config.model.model_name_or_path == "smollm2-135m-instruct"
    assert config.data.dataset_name == "chatterbot-en"


def test_flags_override_the_yaml(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("lora_r: 32\nlearning_rate: 1.0e-4\nuse_dora: true\n")
    config = parse(["--config", str(file), "--lora_r", "8"])
    assert config.lora.lora_r == 8 and config.train.learning_rate == 1e-4 and config.lora.use_dora


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_parses_and_starts_with_its_command(preset):
    first_line = preset.read_text().splitlines()[0]
    launcher = re.match(r"# (python|accelerate launch --config_file (recipes/accelerate/\S+\.yaml)) -m qlora_kit\.recipes\.chat "
                        r"--config recipes/", first_line)
    assert launcher, first_line
    assert launcher.group(2) is None or (ROOT / launcher.group(2)).is_file()
    assert str(preset.relative_to(ROOT)) in first_line
    config = parse(["--config", str(preset)])
    assert set(yaml.safe_load(preset.read_text())) <= field_names()
    assert config.lora.lora_r > 0


@pytest.mark.parametrize("argv, message", [
    (["--lora_r", "0"], "lora_r must be a positive integer"),
    (["--lora_r", "-3"], "lora_r must be a positive integer"),
    (["--lora_r", "many"], "invalid int value"),
    (["--learning_rat", "1e-4"], "unknown argument"),
    (["--optim", "sgd"], "invalid choice"),
])
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--learning_rate", "-1e-4"], r"--learning_rate must be in \(0, 1\] .*got -0.0001"),
    (["--learning_rate", "-0.5"], r"--learning_rate must be in \(0, 1\]"),
    (["--learning_rate", "3"], r"--learning_rate must be in \(0, 1\]"),
    (["--lora_alpha", "-inf"], "--lora_alpha must be a finite number"),
    (["--weight_decay", "1e300"], r"--weight_decay must be in \[0, 1\]"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number"),
    (["--warmup_ratio", "-0.1"], r"--warmup_ratio must be in \[0, 1\)"),
    (["--eval_fraction", "0.99"], r"--eval_fraction must be in \[0, 0.5\] .*--eval_dataset_name"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
    (["--max_steps", "-5"], "--max_steps must be -1"),
    (["--loss_chunk_size", "-2"], "--loss_chunk_size must be 0"),
    (["--dataset_num_proc", "0"], "--dataset_num_proc must be at least 1"),
])
def test_numbers_must_be_finite_and_in_range(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)


def test_yaml_infinity_is_refused_too(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("learning_rate: .inf\n")
    with pytest.raises(UserError, match="--learning_rate must be a finite number"):
        parse(["--config", str(file)])


def test_negative_numbers_parse_as_values():
    assert parse(["--max_steps", "-1", "--resident_layers", "-1", "--lora_dropout", "0"]).train.max_steps == -1
    assert parse(["--eval_fraction", "0.5"]).data.eval_fraction == 0.5


def test_unknown_yaml_field_names_the_field_and_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("lora_rank: 8\n")
    with pytest.raises(UserError, match=r"unknown field\(s\) in .*run.yaml: lora_rank"):
        parse(["--config", str(file)])


def test_help_lists_every_field_with_help():
    result = subprocess.run([sys.executable, "-m", "qlora_kit.recipes.chat", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in field_names():
        assert f"--{name}" in result.stdout
    assert "LoRA rank r." in result.stdout
