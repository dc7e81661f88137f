"""The non-finite guard: a batch that makes the loss NaN is skipped; too many in a row stop the run."""

import json
from contextlib import contextmanager

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from qlora_kit.config import LoraArguments, TrainArguments
from qlora_kit.data.batches import epoch_batches
from qlora_kit.errors import UserError
from qlora_kit.train.guard import NonfiniteGuard, nonfinite_parameters
from qlora_kit.train.metrics import MetricsLog
from qlora_kit.bench.resilience import synthetic_dataset, train_once, write_random_llama

CPU = torch.device("cpu")
POISON = 511  # a token id that the forward hook below turns into NaN embeddings
BATCH = 4
SEED = 42
LORA = LoraArguments(lora_r=8, lora_alpha=16, lora_dropout=0.1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "model", "tiny")


def poisoned_data(steps: list[int]) -> Dataset:
    """16 examples; one example of each listed optimizer step's batch carries the POISON token."""
    rows = synthetic_dataset(16, 32, POISON).to_list()  # ordinary tokens stay below POISON
    batches = epoch_batches([len(r["input_ids"]) for r in rows], BATCH, SEED, epoch=0)
    for step in steps:
        rows[batches[step - 1][0]]["input_ids"][3] = POISON
    return Dataset.from_list(rows)


@contextmanager
def poison_makes_nan():
    """Every embedding lookup of the POISON token yields NaN (as an fp16 overflow or a bad row would)."""

    def hook(module, args, output):
        if isinstance(module, torch.nn.Embedding):
            return output.masked_fill((args[0] == POISON).unsqueeze(-1), float("nan"))
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run(tiny_dir, tmp_path, poison_steps, **fields):
    fields = {"learning_rate": 1e-3, **fields}
    args = TrainArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=BATCH, seed=SEED,
                          logging_steps=1, save_steps=1, **fields)
    with poison_makes_nan():
        train_once(tiny_dir, poisoned_data(poison_steps), args, LORA, CPU)
    return tmp_path / "run"


def files(run_dir, step):
    """The adapter and optimizer-state bytes of a checkpoint, and its per-parameter optimizer states (step counts)."""
    folder = run_dir / "checkpoints" / f"step-{step}"
    found = {name: (folder / name).read_bytes() for name in ("adapter_model.safetensors", "optimizer.safetensors")}
    found["optimizer states"] = json.loads((folder / "optimizer.json").read_text())["state"]
    return found


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_torch"])
def test_a_nan_batch_is_skipped_and_training_goes_on(tiny_dir, tmp_path, optim):
    run_dir = run(tiny_dir, tmp_path, poison_steps=[2], max_steps=3, optim=optim)
    rows = {row["step"]: row for row in MetricsLog(run_dir / "metrics.jsonl").rows()}
    assert rows[2]["skipped_steps"] == 1 and "loss" not in rows[2]
    assert "skipped_steps" not in rows[1] and "skipped_steps" not in rows[3]
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (1, 3))
    # The optimizer did not step: weights, optimizer state and its step counts are as after step 1
    # (the learning-rate schedule moves on: the step counts for it).
    assert files(run_dir, 2) == files(run_dir, 1)
    after = load_file(run_dir / "checkpoints" / "step-3" / "adapter_model.safetensors")
    before = load_file(run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after)
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["nonfinite"]["skipped"] == 1 and state["nonfinite"]["in_a_row"] == 0


def test_without_the_guard_the_nan_reaches_the_weights_but_is_never_saved(tiny_dir, tmp_path):
    with pytest.raises(UserError) as stopped:
        run(tiny_dir, tmp_path, poison_steps=[2], max_steps=3, max_nonfinite_steps=0, optim="paged_adamw_8bit")
    message = str(stopped.value)
    assert "training stopped at step 2" in message and "hold NaN or inf" in message
    assert "checkpoints/step-1, is intact" in message and "--resume_from_checkpoint latest" in message
    run_dir = tmp_path / "run"
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-1"]
    assert not (run_dir / "adapter_model.safetensors").exists()


def strict_json_rows(path):
    """Every line of a metrics.jsonl, parsed by a reader that refuses NaN and Infinity as JSON does."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw_torch"])
def test_an_infinite_learning_rate_never_reaches_the_weights(tiny_dir, tmp_path, optim):
    # The recipe refuses --learning_rate inf (tests/test_config.py); the guard holds even without that check.
    run_dir = run(tiny_dir, tmp_path, poison_steps=[], max_steps=3, optim=optim, learning_rate=float("inf"))
    rows = strict_json_rows(run_dir / "metrics.jsonl")
    assert [row.get("skipped_steps") for row in rows] == [1, 1, 1]
    assert files(run_dir, 3)["adapter_model.safetensors"] == files(run_dir, 1)["adapter_model.safetensors"]
    adapter = load_file(run_dir / "checkpoints" / "step-3" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_metrics_rows_are_valid_json_when_a_value_is_not_finite(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "eval": [float("-inf"), 1.0]})
    assert strict_json_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None,
                                                            "eval": [None, 1.0]}]


def test_a_non_finite_bitsandbytes_update_is_undone_per_parameter():
    import bitsandbytes as bnb

    parameter = torch.nn.Parameter(torch.randn(16, 16))
    optimizer = bnb.optim.AdamW8bit([parameter], lr=1e-3)
    original = optimizer.update_step

    def update_to_nan(group, p, gindex, pindex):  # finite loss and gradients, yet the update blows up
        original(group, p, gindex, pindex)
        p.data.fill_(float("nan"))

    optimizer.update_step = update_to_nan
    guard = NonfiniteGuard(optimizer, 3, CPU)
    before = parameter.detach().clone()
    parameter.grad = torch.randn_like(parameter)
    guard.check(torch.tensor(1.0), parameter.grad.norm(), [1e-3])
    optimizer.step()
    guard.after_step(1)
    assert torch.equal(parameter.detach(), before)
    report = guard.read()
    assert report.skipped == 1 and report.in_a_row == 1 and not report.tripped


def test_a_non_finite_torch_update_trips_the_guard_at_once():
    parameter = torch.nn.Parameter(torch.full((4,), -3e38))
    optimizer = torch.optim.AdamW([parameter], lr=3e38, fused=True)  # finite, but the step overflows to -inf
    guard = NonfiniteGuard(optimizer, 5, CPU)
    parameter.grad = torch.ones_like(parameter)
    guard.check(torch.tensor(1.0), parameter.grad.norm(), [3e38])
    optimizer.step()
    guard.after_step(1)
    report = guard.read()
    assert report.skipped == 1 and report.tripped
    assert nonfinite_parameters({"weight": parameter}) == ["weight"]


def test_too_many_in_a_row_stop_with_the_weights_from_before(tiny_dir, tmp_path):
    with pytest.raises(UserError) as stopped:
        run(tiny_dir, tmp_path, poison_steps=[2, 3, 4], max_steps=4, max_nonfinite_steps=2, optim="paged_adamw_8bit")
    message = str(stopped.value)
    assert "training stopped at step 3: 2 optimizer steps in a row from step 2 on" in message
    assert "the weights are those of step 1" in message and "--learning_rate" in message
    run_dir = tmp_path / "run"
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-1", "step-2", "step-3"]
    assert files(run_dir, 3)["adapter_model.safetensors"] == files(run_dir, 1)["adapter_model.safetensors"]
