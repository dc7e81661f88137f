"""Data parallel: two processes (`accelerate launch --multi_gpu`, on CPU with gloo) train as one process with a
batch twice as large. (`accelerate launch --cpu --num_processes 2` starts a single process: multi-CPU runs
need `--multi_gpu`, which starts torchrun, or MPI.)"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import LoraArguments, StreamArguments, TrainArguments, parse
from qlora_kit.errors import UserError
from qlora_kit.memory.apply import refuse_streaming_across_processes
from qlora_kit.output import resume_differences
from qlora_kit.data.batches import process_share
from qlora_kit.bench.resilience import step_losses, synthetic_dataset, train_once, write_random_llama

# 13 examples in global batches of 4: the last batch of each epoch holds one, so one process gets a filler.
EXAMPLES, LENGTH, VOCAB = 13, 32, 512
LORA = LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)  # no dropout: its random masks differ per process
ARGS = TrainArguments(max_steps=4, gradient_accumulation_steps=2, learning_rate=2e-3, warmup_ratio=0.0,
                      logging_steps=1, save_steps=4, optim="adamw_torch")

TRAIN_SCRIPT = """
import sys
from dataclasses import replace
from pathlib import Path
import torch
from qlora_kit.bench.resilience import synthetic_dataset, train_once
sys.path.insert(0, sys.argv[3])
from test_data_parallel import ARGS, EXAMPLES, LENGTH, LORA, VOCAB
args = replace(ARGS, output_dir=sys.argv[2], per_device_train_batch_size=int(sys.argv[4]))
train_once(Path(sys.argv[1]), synthetic_dataset(EXAMPLES, LENGTH, VOCAB), args, LORA, torch.device("cpu"))
"""

# With dropout, each process draws its own masks: a resume is exact only if every process's RNG comes back.
RESUME_SCRIPT = """
import sys
from dataclasses import replace
from pathlib import Path
import torch
from qlora_kit.config import LoraArguments
from qlora_kit.bench.resilience import synthetic_dataset, train_once
sys.path.insert(0, sys.argv[3])
from test_data_parallel import ARGS, EXAMPLES, LENGTH, VOCAB
model, work = Path(sys.argv[1]), Path(sys.argv[2])
lora = LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.1)
args = replace(ARGS, per_device_train_batch_size=2, save_steps=2)
data = synthetic_dataset(EXAMPLES, LENGTH, VOCAB)
train_once(model, data, replace(args, output_dir=str(work / "straight")), lora, torch.device("cpu"))
train_once(model, data, replace(args, output_dir=str(work / "resumed")), lora, torch.device("cpu"),
           resume_dir=work / "straight" / "checkpoints" / "step-2")
"""


def test_a_batch_is_dealt_out_by_length_and_a_process_left_without_one_gets_a_filler():
    assert process_share([7, 3, 5, 1], 0, 2) == ([7, 5], False)
    assert process_share([7, 3, 5, 1], 1, 2) == ([3, 1], False)
    assert process_share([9], 1, 2) == ([9], True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("dp") / "model", "tiny")


def launch(source: str, model_dir: Path, out: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    script = out.parent / f"script-{out.name}.py"
    script.write_text(source)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               str(model_dir), str(out), str(Path(__file__).parent), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, model_dir):
    one = tmp_path / "one-process"
    train_once(model_dir, synthetic_dataset(EXAMPLES, LENGTH, VOCAB),
               replace(ARGS, output_dir=str(one), per_device_train_batch_size=4), LORA, torch.device("cpu"))
    two = tmp_path / "two-processes"
    result = launch(TRAIN_SCRIPT, model_dir, two, "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "plain loss" not in result.stderr  # the chunked loss, through the DistributedDataParallel wrapper

    expected, got = step_losses(one), step_losses(two)
    assert sorted(got) == [1, 2, 3, 4]  # one metrics row a step: written once, not once per process
    assert got == pytest.approx(expected, rel=1e-5)  # fp32: the same sums, added in another order
    adapter = "checkpoints/step-4/adapter_model.safetensors"
    a, b = load_file(one / adapter), load_file(two / adapter)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    assert any("lora_B" in name and b[name].abs().sum() > 0 for name in b)  # trained: B starts at zero


def test_a_two_process_run_resumes_exactly(tmp_path, model_dir):
    result = launch(RESUME_SCRIPT, model_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert {p.name for p in (straight / "checkpoints" / "step-2").glob("rng*")} == {
        "rng.safetensors", "rng.json", "rng-1.safetensors", "rng-1.json"}  # both processes' generators
    assert step_losses(resumed) == step_losses(straight)  # bit for bit
    adapter = "checkpoints/step-4/adapter_model.safetensors"
    a, b = load_file(straight / adapter), load_file(resumed / adapter)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resuming_with_another_number_of_processes_is_refused():
    saved = {"resolved": {"num_processes": 2}}
    refused, _ = resume_differences(saved, parse([]), {"model_fingerprint": "", "data_fingerprint": None,
                                                       "num_processes": 1})
    assert refused == ["the number of processes 2 -> 1 (the global batch and each process's share of the data "
                       "would differ; resume with 2)"]


LONG_SCRIPT = TRAIN_SCRIPT.replace("per_device_train_batch_size=int(sys.argv[4]))",
                                   "per_device_train_batch_size=2, max_steps=1000, save_steps=1000)")


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(tmp_path, model_dir):
    out = tmp_path / "run"
    script = tmp_path / "script.py"
    script.write_text(LONG_SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               str(model_dir), str(out), str(Path(__file__).parent)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if str(script) in p.cmdline()]
    second = next(p for p in workers if p.environ().get("RANK") == "1")
    second.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=600)

    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in workers)
    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].removeprefix("step-"))
    assert stderr.count(f"stopped by SIGTERM after step {stopped_at}") == 2, stderr[-3000:]  # both, the same step
    assert max(step_losses(out)) == stopped_at


# Process 1 dies outright (no handler runs) when the processes compare notes after step 2.
DEATH_SCRIPT = """
import sys
from dataclasses import replace
from pathlib import Path
import torch
from qlora_kit.errors import exit_on_user_error
from qlora_kit.bench.resilience import synthetic_dataset, train_once
sys.path.insert(0, sys.argv[3])
from dying_process import die_after_step_2
from test_data_parallel import ARGS, EXAMPLES, LENGTH, LORA, VOCAB
die_after_step_2()
args = replace(ARGS, output_dir=sys.argv[2], per_device_train_batch_size=2, max_steps=1000, save_steps=1)
exit_on_user_error(train_once)(Path(sys.argv[1]), synthetic_dataset(EXAMPLES, LENGTH, VOCAB), args, LORA,
                               torch.device("cpu"))
"""


def test_a_process_that_dies_makes_the_other_stop_with_one_line(tmp_path, model_dir):
    out = tmp_path / "run"
    started = time.time()
    result = launch(DEATH_SCRIPT, model_dir, out)
    assert result.returncode != 0 and time.time() - started < 300  # no hang in the dead process's collective
    newest = out / "checkpoints" / "step-1"  # step 2's exchange is where process 1 died: before its checkpoint
    line = (f"error: process 0 of 2: another process of this run died after step 2 (its own error is above); "
            f"stopping too. The newest checkpoint is {newest}: resume with --resume_from_checkpoint {newest}.")
    assert line in result.stderr.splitlines(), result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]


def test_layer_streaming_with_several_processes_is_refused_before_anything_loads(model_dir):
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(UserError, match=f"{layers - 1} of {layers} decoder layers would stream .* one process only"):
        refuse_streaming_across_processes(StreamArguments(resident_layers=1), model_dir, 2)
    refuse_streaming_across_processes(StreamArguments(resident_layers=1), model_dir, 1)  # one process streams
    refuse_streaming_across_processes(StreamArguments(resident_layers=layers), model_dir, 2)  # none streams
    refuse_streaming_across_processes(StreamArguments(), model_dir, 2)  # the plan keeps every layer


def test_the_recipe_shares_the_data_between_two_processes(tmp_path, demo_model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qlora_kit.recipes.chat",
               "--model_name_or_path", str(demo_model_dir), "--dataset_name", str(data), "--output_dir", str(out),
               "--max_steps", "2", "--eval_fraction", "0", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]  # written once, by one process
    assert rows[-1]["epoch"] == 1.0  # 8 examples in global batches of 2 x 2: one epoch, each process its half
    assert "num_processes: 2" in (out / "run_config.yaml").read_text()
    assert result.stderr.count("[qlora_kit] done: 2 steps") == 1  # the first process speaks for the run
