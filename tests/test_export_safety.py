"""The user's folders are safe: refusals before any write, a complete folder or none, room on disk checked first."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from export_runs import make_run
from tiny_models import BROKEN_MODELS
from qlora_kit.export.cli import main
from qlora_kit.bench.random_model import preset_config, write_random_model, write_random_run
from tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    base, run_dir, _ = make_run(folder, "llama")
    return base, run_dir


def export(capsys, *argv):
    """Run the command in-process; return (exit code, the stderr lines that start with 'error:')."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, errors


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target, expected", [
    (lambda base, run: base, "is the base model folder"),
    (lambda base, run: run, "is the adapter folder"),
    (lambda base, run: run.parent, "is the base model folder or holds it"),
])
def test_refuses_to_write_over_the_base_or_the_adapter_even_with_overwrite(run, capsys, target, expected):
    base, run_dir = run
    before = snapshot(run_dir.parent)
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--output_dir", str(target(base, run_dir)),
                          "--overwrite", "true")
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert snapshot(run_dir.parent) == before


def test_refuses_a_non_empty_folder_without_overwrite_and_replaces_it_with(run, capsys, tmp_path):
    base, run_dir = run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--output_dir", str(out))
    assert code == 2 and "is not empty" in errors[0] and "--overwrite true" in errors[0]
    assert snapshot(out) == {Path("notes.txt"): b"mine"}
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--output_dir", str(out), "--overwrite", "true")
    assert code == 0 and not errors
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no partial or old folder left beside it


@pytest.mark.parametrize("make_args, expected", [
    (lambda tmp, run: ["--adapter_dir", str(tmp / "nowhere")], "does not exist"),
    (lambda tmp, run: ["--adapter_dir", str(tmp)], "holds no PEFT adapter"),
    (lambda tmp, run: ["--adapter_dir", str(run), "--base_model", str(tmp / "nowhere")], "does not exist"),
    (lambda tmp, run: ["--adapter_dir", str(run), "--merge_base", "int8"], "invalid choice"),
    (lambda tmp, run: ["--adapter_dir", str(run), "--max_shard_size", "big"], "is not a size"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, capsys, tmp_path, make_args, expected):
    out = tmp_path / "merged"
    code, errors = export(capsys, *make_args(tmp_path, run[1]), "--output_dir", str(out))
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("break_model", BROKEN_MODELS)
def test_a_broken_base_model_folder_is_one_line_and_writes_nothing(run, capsys, tmp_path, break_model):
    base = tmp_path / "base"
    expected = break_model(base)
    before = snapshot(base)
    out = tmp_path / "merged"
    code, errors = export(capsys, "--adapter_dir", str(run[1]), "--base_model", str(base), "--output_dir", str(out))
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"] and snapshot(base) == before


def test_an_output_dir_under_a_file_is_refused_before_writing(run, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "merged"
    code, errors = export(capsys, "--adapter_dir", str(run[1]), "--output_dir", str(out))
    assert code == 2 and len(errors) == 1, errors
    assert f"--output_dir {out} cannot be created: {tmp_path / 'notes.txt'} is a file" in errors[0]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_an_adapter_for_another_model_is_refused(capsys, tmp_path):
    _, run_dir, _ = make_run(tmp_path / "llama", "llama")
    other, _, _ = make_run(tmp_path / "gpt2", "gpt2")
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(other),
                          "--output_dir", str(tmp_path / "merged"))
    assert code == 2 and "its config differs from the fingerprint" in errors[0], errors
    # Told to merge onto it anyway, the module names still do not fit.
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(other),
                          "--output_dir", str(tmp_path / "merged"), "--allow_other_base", "true")
    assert code == 2 and "does not have" in errors[0], errors
    assert not (tmp_path / "merged").exists()


def test_too_little_disk_space_fails_before_writing(run, capsys, tmp_path, monkeypatch):
    # A full disk cannot be arranged here; the check reads the free space from shutil.disk_usage.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    code, errors = export(capsys, "--adapter_dir", str(run[1]), "--output_dir", str(tmp_path / "merged"))
    assert code == 2 and "GB free" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def test_a_partial_folder_left_by_a_killed_export_is_removed(run, capsys, tmp_path):
    stale = tmp_path / ".merged.partial-999999999"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    code, _ = export(capsys, "--adapter_dir", str(run[1]), "--output_dir", str(tmp_path / "merged"))
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_partial_folders_of_dead_exports_are_removed_and_named_and_live_ones_kept(run, capsys, tmp_path, said):
    finished = subprocess.run([sys.executable, "-c", "import os, time; print(os.getpid(), time.time())"],
                              capture_output=True, text=True)
    dead_pid, dead_started = finished.stdout.split()
    me = psutil.Process()
    folders = {  # name -> (owner pid, its start time): one dead, one whose pid was reused, one alive
        ".other.partial-1": (int(dead_pid), float(dead_started)),
        ".merged.partial-2": (me.pid, me.create_time() - 1000),
        ".busy.partial-3": (me.pid, me.create_time()),
    }
    for name, (pid, started) in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
        (tmp_path / name / ".owner").write_text(json.dumps({"pid": pid, "started": started}))
    code, _ = export(capsys, "--adapter_dir", str(run[1]), "--output_dir", str(tmp_path / "merged"))
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == [".busy.partial-3", "merged"]
    removed = [r.getMessage() for r in said if r.getMessage().startswith("removed ")]
    assert removed == [f"removed {tmp_path / name} (0.0 MB), left by an export that was killed"
                       for name in (".merged.partial-2", ".other.partial-1")]
    assert not (tmp_path / "merged" / ".owner").exists()


def test_the_cli_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools/export_merged.py"), "--adapter_dir",
                             str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --adapter_dir")


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A model big enough that its export takes seconds on a CPU, so it can be interrupted midway."""
    folder = tmp_path_factory.mktemp("interrupt")
    base = write_random_model(folder / "base", preset_config("tiny", num_layers=24), max_shard_size="4MB")
    return write_random_run(folder / "run", base, compute_dtype="float32")


@pytest.mark.parametrize("sig, earlier_output", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_an_interrupted_export_is_one_line_and_leaves_no_output_folder(slow_run, tmp_path, sig, earlier_output):
    out = tmp_path / "merged"
    if earlier_output:
        out.mkdir()
        (out / "config.json").write_text("{}")
    command = [sys.executable, str(ROOT / "tools/export_merged.py"), "--adapter_dir", str(slow_run),
               "--output_dir", str(out), "--overwrite", "true", "--max_shard_size", "4MB"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not any(tmp_path.glob(".merged.partial-*/model-00002-*.safetensors")) and time.monotonic() < deadline:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.kill(child.pid, sig)
    stderr = child.communicate(timeout=120)[1].decode()
    assert child.returncode == 128 + sig and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.splitlines()[-1] == (f"[qlora_kit] stopped by {signal.Signals(sig).name} while merging the adapter "
                                       f"into its base model; --output_dir {out} was left as it was; run the same "
                                       f"command to start again")
    assert [p.name for p in tmp_path.iterdir()] == (["merged"] if earlier_output else [])
    if earlier_output:
        assert snapshot(out) == {Path("config.json"): b"{}"}


def test_an_adapter_whose_shapes_do_not_fit_the_base_is_refused_before_writing(capsys, tmp_path):
    _, run_dir, _ = make_run(tmp_path / "a", "llama")
    other, _, _ = make_run(tmp_path / "b", "llama", model_overrides={"intermediate_size": 96})
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(other),
                          "--output_dir", str(tmp_path / "merged"), "--allow_other_base", "true")
    assert code == 2 and "does not fit the base weight" in errors[0], errors
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


# ---------------------------------------------------------------- the base model and the quantization are the run's

@pytest.fixture
def notices(monkeypatch):
    """The notices export gives, each time it gives them (notice_once dedupes across tests)."""
    said = []
    for module in ("qlora_kit.export.merge", "qlora_kit.export.settings"):
        monkeypatch.setattr(f"{module}.notice_once", said.append)
    return said


EXACT = "so the merged model computes what the adapter model computed"


def test_a_base_with_the_same_shapes_and_other_weights_is_refused(run, capsys, tmp_path, notices):
    base, run_dir = run
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert (other / "config.json").read_bytes() == (base / "config.json").read_bytes()
    out = tmp_path / "merged"
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(other), "--output_dir", str(out))
    assert code == 2 and len(errors) == 1, errors
    assert f"--base_model {other} is not the model" in errors[0] and "its weights differ" in errors[0], errors
    assert "--allow_other_base true" in errors[0] and not any(EXACT in line for line in notices)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(other), "--output_dir", str(out),
                          "--allow_other_base", "true")
    assert code == 0 and not errors and (out / "model.safetensors").is_file()
    assert not any(EXACT in line for line in notices)
    assert any("not known that the merged model computes" in line for line in notices), notices


def test_the_same_base_moved_elsewhere_is_accepted(run, capsys, tmp_path, notices):
    base, run_dir = run
    moved = shutil.copytree(base, tmp_path / "downloaded-again")
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--base_model", str(moved),
                          "--output_dir", str(tmp_path / "merged"))
    assert code == 0 and not errors and any(EXACT in line for line in notices), notices


def test_a_base_changed_in_place_since_training_is_refused(capsys, tmp_path):
    base, run_dir, _ = make_run(tmp_path / "a", "llama")
    save_tiny_model(base, seed=1)  # the folder run_config.yaml names now holds other weights
    before = snapshot(tmp_path)
    code, errors = export(capsys, "--adapter_dir", str(run_dir), "--output_dir", str(tmp_path / "merged"))
    assert code == 2 and len(errors) == 1 and f"the base model in {base} has changed" in errors[0], errors
    assert snapshot(tmp_path) == before


def test_a_run_without_a_base_fingerprint_says_the_base_is_unchecked(run, capsys, tmp_path, notices):
    base, run_dir = run
    older = shutil.copytree(run_dir, tmp_path / "older-run")
    recorded = yaml.safe_load((older / "run_config.yaml").read_text())
    del recorded["resolved"]["model_fingerprint"]
    (older / "run_config.yaml").write_text(yaml.safe_dump(recorded))
    code, errors = export(capsys, "--adapter_dir", str(older), "--output_dir", str(tmp_path / "merged"))
    assert code == 0 and not errors
    assert [line for line in notices if "records no fingerprint of its base model" in line] != []
    assert not any(EXACT in line for line in notices), notices


@pytest.fixture
def bare_adapter(run, tmp_path):
    """The run's adapter as a bare PEFT folder: no run_config.yaml, so no record of the quantization."""
    bare = shutil.copytree(run[1], tmp_path / "bare")
    (bare / "run_config.yaml").unlink()
    return bare


@pytest.mark.parametrize("flags", [[], ["--verify", "true", "--merge_base", "original"]])
def test_a_bare_adapter_needs_the_compute_dtype_before_anything_is_written(bare_adapter, capsys, tmp_path, notices,
                                                                            flags):
    code, errors = export(capsys, "--adapter_dir", str(bare_adapter), "--output_dir", str(tmp_path / "merged"), *flags)
    assert code == 2 and len(errors) == 1, errors
    assert "has no run_config.yaml" in errors[0] and "--bnb_4bit_compute_dtype" in errors[0], errors
    assert "--bnb_4bit_use_double_quant" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
    assert not any(EXACT in line for line in notices)


def test_a_bare_adapter_with_the_flags_merges_as_its_run_does(run, bare_adapter, capsys, tmp_path, notices):
    """The run trained in float32: given that, the bare adapter's merge is the run's, byte for byte."""
    code, _ = export(capsys, "--adapter_dir", str(run[1]), "--output_dir", str(tmp_path / "from-run"))
    assert code == 0
    code, errors = export(capsys, "--adapter_dir", str(bare_adapter), "--output_dir", str(tmp_path / "from-bare"),
                          "--bnb_4bit_compute_dtype", "float32", "--bnb_4bit_use_double_quant", "true")
    assert code == 0 and not errors
    merged = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("from-run", "from-bare")]
    assert merged[0] == merged[1]
    code, errors = export(capsys, "--adapter_dir", str(bare_adapter), "--output_dir", str(tmp_path / "original"),
                          "--merge_base", "original")
    assert code == 0 and not errors  # the original weights do not depend on how training quantized them
