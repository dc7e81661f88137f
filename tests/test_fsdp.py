"""FSDP2-sharded QLoRA with two processes on CPU (gloo): the recipe under recipes/accelerate/fsdp2.yaml trains as
one process with twice the batch, writes checkpoints and the adapter in the one-process format, and resumes exactly;
the sharded loader gives each process half of the parameters and the LoRA weights one process would draw."""

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
import torch
from safetensors.torch import load_file

from qlora_kit.config import parse
from qlora_kit.errors import UserError
from qlora_kit.launch import LaunchSettings
from qlora_kit.memory.budget import PlanSettings
from qlora_kit.memory.plan import plan_memory
from qlora_kit.memory.shapes import model_shape
from qlora_kit.model.shard import refuse_unshardable
from qlora_kit.bench.resilience import step_losses
from tiny_models import save_tiny_model, tiny_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
# 10 training conversations in global batches of 4, 2 micro-batches a step: the last batch of the epoch holds 2.
RUN = ["--max_steps", "4", "--eval_fraction", "0.25", "--eval_steps", "2", "--gradient_accumulation_steps", "2",
       "--logging_steps", "1", "--save_steps", "2", "--optim", "adamw_torch", "--lora_dropout", "0",
       "--learning_rate", "2e-3", "--warmup_ratio", "0", "--lora_r", "4", "--lora_alpha", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random chat model (4 layers, fp32 weights) with its tokenizer, and 13 conversations."""
    folder = save_tiny_model(tmp_path_factory.mktemp("fsdp") / "model", dtype=torch.float32, num_hidden_layers=4)
    tiny_chat_tokenizer().save_pretrained(folder)
    data = folder.parent / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?" + " more" * (i % 5)},
        {"role": "assistant", "content": f"It is {2 * i}." + " really" * (i % 3)}]}) + "\n" for i in range(13)))
    return folder, data


def recipe(model: Path, data: Path, out: Path, *extra: str, processes: int = 1,
           fsdp_config: Path = FSDP_CONFIG) -> subprocess.CompletedProcess:
    """The chat recipe as a user runs it: one plain process, or `accelerate launch` with an FSDP configuration
    (processes=0: one process under it)."""
    args = ["-m", "qlora_kit.recipes.chat", "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(out), *RUN, *extra]
    launcher = ([] if processes == 1 else ["-m", "accelerate.commands.launch", "--config_file", str(fsdp_config),
                                           "--num_processes", str(max(processes, 1))])
    result = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=900, env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def eval_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}


def replies(run: Path) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["reply"]) for row in rows if "reply" in row]


def assert_close_files(first: Path, second: Path, name: str, exact: bool = False) -> None:
    a, b = load_file(first / name), load_file(second / name)
    assert a.keys() == b.keys(), name
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


@pytest.fixture(scope="module")
def fsdp_run(chat_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    model, data = chat_model
    out = tmp_path_factory.mktemp("fsdp-run") / "two"
    return out, recipe(model, data, out, "--per_device_train_batch_size", "2", processes=2)


@pytest.fixture(scope="module")
def one_process_run(chat_model, tmp_path_factory) -> Path:
    model, data = chat_model
    out = tmp_path_factory.mktemp("one-process") / "one"
    recipe(model, data, out, "--per_device_train_batch_size", "4")
    return out


def test_two_fsdp_processes_train_as_one_process_with_twice_the_batch(one_process_run, fsdp_run):
    one = one_process_run
    two, result = fsdp_run

    assert "FSDP2 over 2 processes" in result.stderr
    assert "launch: 2 processes, FSDP2-sharded" in (two / "run_config.yaml").read_text()
    assert (result.stdout + result.stderr).count("step 2: eval loss") == 1  # one process speaks for the run
    expected, got = step_losses(one), step_losses(two)
    assert sorted(got) == [1, 2, 3, 4]  # written once, by one process
    assert got == pytest.approx(expected, rel=1e-5)  # fp32: the same sums, reduced in another order
    assert eval_losses(two) == pytest.approx(eval_losses(one), rel=1e-5)
    # Sample replies: both processes generate in step, one writes; greedy, so the same text as one process's.
    assert replies(two) == replies(one) and len(replies(two)) == 6  # 3 eval prompts at steps 2 and 4
    # The same files, in the same format, as a one-process run (plus the second process's RNG state).
    for run_file in ("adapter_model.safetensors", "checkpoints/step-4/adapter_model.safetensors",
                     "checkpoints/step-4/optimizer.safetensors"):
        assert_close_files(one, two, run_file)
    names = {p.name for p in (two / "checkpoints" / "step-4").iterdir()}
    assert names == {p.name for p in (one / "checkpoints" / "step-4").iterdir()} | {"rng-1.json", "rng-1.safetensors"}
    step4 = "checkpoints/step-4/optimizer.json"
    assert json.loads((one / step4).read_text()) == json.loads((two / step4).read_text())
    assert json.loads((one / "adapter_config.json").read_text()) == json.loads((two / "adapter_config.json").read_text())
    adapter = load_file(two / "adapter_model.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in adapter.items())  # trained


def test_fsdp_with_one_process_is_the_plain_run(chat_model, one_process_run, tmp_path):
    model, data = chat_model
    solo = tmp_path / "solo"
    result = recipe(model, data, solo, "--per_device_train_batch_size", "4", processes=0)
    assert "FSDP2 over 1 process:" in result.stderr
    assert step_losses(solo) == step_losses(one_process_run)  # bit for bit: the same sums in the same order
    assert eval_losses(solo) == eval_losses(one_process_run)
    assert_close_files(one_process_run, solo, "adapter_model.safetensors", exact=True)


def test_a_two_process_fsdp_run_resumes_exactly(chat_model, fsdp_run, tmp_path):
    model, data = chat_model
    straight, _ = fsdp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    recipe(model, data, resumed, "--per_device_train_batch_size", "2", "--resume_from_checkpoint",
           str(resumed / "checkpoints" / "step-2"), processes=2)
    assert step_losses(resumed) == step_losses(straight)  # bit for bit: the split optimizer states came back
    assert eval_losses(resumed) == eval_losses(straight)
    assert_close_files(straight, resumed, "adapter_model.safetensors", exact=True)


LOADER_SCRIPT = """
import json
import os
import sys
from pathlib import Path
import bitsandbytes.nn.modules
import torch
bitsandbytes.nn.modules.has_avx512bf16 = lambda: sys.argv[3] == "True"  # both sides of bitsandbytes' CPU repack
from transformers import set_seed
from qlora_kit.config import parse
from qlora_kit.launch import launch_settings
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.model.bnb_cpu import four_bit_layers
from qlora_kit.model.shard import load_sharded, parameter_bytes, trainable_tensors
from qlora_kit.model.stream_load import load_model
from qlora_kit.model.targets import find_decoder_blocks

torch.distributed.init_process_group("gloo")
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
config = parse(["--model_name_or_path", str(model_dir), "--optim", "adamw_torch", "--lora_dropout", "0"])
cpu = torch.device("cpu")
set_seed(config.train.seed)
plain = add_lora(load_model(model_dir, config.model, config.stream, torch.float32, cpu), config.lora, torch.float32)
set_seed(config.train.seed)
sharded = load_sharded(model_dir, config, torch.float32, torch.float32, cpu, launch_settings())
first = [{k: v.detach().clone() for k, v in trainable_tensors(m).items()} for m in (plain, sharded)]
held, whole = parameter_bytes(sharded)


def local_bytes(parameters):
    return sum(p.to_local().numel() * p.element_size() for p in parameters)


blocks = find_decoder_blocks(sharded.base_model.model)[1]
states = [layer.quant_state for layer in four_bit_layers(sharded)]
state_tensors = [t for s in states for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code)]
measured = {"layers": local_bytes(p for p in blocks.parameters() if not p.requires_grad),
            "lora": local_bytes(p for p in sharded.parameters() if p.requires_grad),
            "states": sum(t.numel() * t.element_size() for t in state_tensors)}
torch.manual_seed(0)
ids = torch.randint(0, 500, (2, 24))
losses = []
for model in (plain, sharded):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    losses.append(loss.item())
after = trainable_tensors(plain), trainable_tensors(sharded)
rank = torch.distributed.get_rank()
(out / f"rank-{rank}.json").write_text(json.dumps({
    "names_equal": first[0].keys() == first[1].keys(),
    "init_equal": all(torch.equal(first[0][k], first[1][k]) for k in first[0]),
    "held": held, "whole": whole, "plain_bytes": sum(p.numel() * p.element_size() for p in plain.parameters()),
    "measured": measured,
    "losses": losses, "after_diff": max((after[0][k] - after[1][k]).abs().max().item() for k in after[0]),
}))
"""


@pytest.mark.parametrize("avx512bf16", [True, False])
def test_the_sharded_loader_gives_each_process_half_and_the_lora_weights_one_process_draws(chat_model, tmp_path,
                                                                                           avx512bf16):
    model, _ = chat_model
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(model),
               str(tmp_path), str(avx512bf16)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert found["names_equal"] and found["init_equal"]  # same seed, same draws as the one-process setup
        assert found["whole"] == found["plain_bytes"]  # the same parameters, stored as FSDP needs them
        assert found["held"] <= found["whole"] / 2 + 4096  # half of each, up to one padding row per tensor
        assert found["losses"][0] == pytest.approx(found["losses"][1], rel=1e-6)
        assert found["after_diff"] < 1e-6  # two AdamW steps later: the same weights
        # The memory plan's FSDP rows for these settings, against this process's sharded tensors.
        settings = PlanSettings(compute_dtype="float32", lora_dtype="float32", optim="adamw_torch", num_processes=2,
                                fsdp=True)
        rows = {row.name: row.bytes for row in plan_memory(model_shape(str(model)), settings, 2**34, 2**36).rows}
        assert found["measured"] == {"layers": rows["decoder layers' parameters, 1/2 shard"],
                                     "lora": rows["LoRA weights, 1/2 shard"],
                                     "states": rows["NF4 quantization states, whole"]}


@pytest.mark.parametrize("flag, value, says", [
    ("--optim", "paged_adamw_8bit", "--optim adamw_torch"),
    ("--use_dora", "true", "DoRA"),
    ("--resident_layers", "2", "drop them"),
])
def test_settings_fsdp_cannot_run_are_refused_before_loading(flag, value, says):
    config = parse(["--optim", "adamw_torch", flag, value])
    with pytest.raises(UserError, match=says):
        refuse_unshardable(config, LaunchSettings(num_processes=2, fsdp=True))
    refuse_unshardable(parse(["--optim", "adamw_torch"]), LaunchSettings(num_processes=2, fsdp=True))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp2.yaml", "fsdp2-offload.yaml"])
def test_fsdp_with_one_process_on_a_gpu_trains_as_a_plain_run(chat_model, tmp_path, config):
    model, data = chat_model
    plain = tmp_path / "plain"
    recipe(model, data, plain, "--per_device_train_batch_size", "4")
    sharded = tmp_path / "sharded"
    result = recipe(model, data, sharded, "--per_device_train_batch_size", "4", processes=0,
                    fsdp_config=FSDP_CONFIG.with_name(config))
    assert "FSDP2 over 1 process" in result.stderr
    assert step_losses(sharded) == pytest.approx(step_losses(plain), rel=1e-2)  # bf16 on the GPU
    adapter = "adapter_model.safetensors"
    assert load_file(plain / adapter).keys() == load_file(sharded / adapter).keys()


@pytest.mark.parametrize("name, kind, fsdp", [
    ("ddp.yaml", "MULTI_GPU", False), ("fsdp2.yaml", "FSDP", True), ("fsdp2-offload.yaml", "FSDP", True)])
def test_the_shipped_accelerate_configurations_read_as_accelerate_reads_them(name, kind, fsdp):
    from accelerate.commands.config.config_args import load_config_from_file

    from qlora_kit.launch import launch_settings

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / name))
    assert config.distributed_type.name == kind and config.num_processes == 2
    if fsdp:
        assert config.fsdp_config["fsdp_version"] == 2
        env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
               "FSDP_OFFLOAD_PARAMS": str(config.fsdp_config["fsdp_offload_params"]).lower(),
               "FSDP_RESHARD_AFTER_FORWARD": str(config.fsdp_config["fsdp_reshard_after_forward"]).lower()}
        assert launch_settings(env) == LaunchSettings(2, True, name == "fsdp2-offload.yaml", True)


def test_sigterm_to_one_fsdp_process_stops_both_after_the_same_step_with_one_checkpoint(chat_model, tmp_path):
    model, data = chat_model
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", "-m", "qlora_kit.recipes.chat", "--model_name_or_path", str(model),
               "--dataset_name", str(data), "--output_dir", str(out), *RUN, "--per_device_train_batch_size", "2",
               "--max_steps", "1000", "--save_steps", "1000", "--eval_steps", "1000"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "qlora_kit.recipes.chat" in p.cmdline()
               and p.environ().get("RANK") is not None]
    next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=600)

    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(checkpoints) == 1, checkpoints  # written once, with the states gathered from both
    stopped_at = int(checkpoints[0].removeprefix("step-"))
    assert stderr.count(f"stopped by SIGTERM after step {stopped_at}") == 2, stderr[-3000:]  # both, the same step
    assert max(step_losses(out)) == stopped_at
    assert load_file(out / "checkpoints" / checkpoints[0] / "adapter_model.safetensors")  # whole, readable


# Process 1 dies outright when the processes compare notes after step 2. The synthetic data's first
# micro-batch leaves one process without a trained token, so the chunked-loss check must run its forwards anyway.
DEATH_SCRIPT = """
import sys
from pathlib import Path
import qlora_kit.train.loop as loop
from qlora_kit.bench.resilience import PAD_ID, synthetic_dataset
from qlora_kit.config import parse
from qlora_kit.errors import exit_on_user_error
from qlora_kit.launch import launch_settings
from qlora_kit.model.shard import load_sharded
import torch
sys.path.insert(0, sys.argv[3])
from dying_process import die_after_step_2
die_after_step_2()
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
config = parse(["--model_name_or_path", str(model_dir), "--optim", "adamw_torch", "--lora_dropout", "0",
                "--output_dir", str(out), "--max_steps", "1000", "--save_steps", "1", "--per_device_train_batch_size", "2"])
accelerator = loop.make_accelerator()
model = load_sharded(model_dir, config, torch.float32, torch.float32, accelerator.device, launch_settings())
out.mkdir(parents=True, exist_ok=True)  # both processes run this
exit_on_user_error(loop.train)(model, synthetic_dataset(13, 32, 500), None, config.train, accelerator, out, PAD_ID)
"""


def test_an_fsdp_process_that_dies_makes_the_other_stop_with_one_line(chat_model, tmp_path):
    model, _ = chat_model
    script, out = tmp_path / "dies.py", tmp_path / "run"
    script.write_text(DEATH_SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "2", str(script), str(model), str(out), str(Path(__file__).parent)]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode != 0 and time.time() - started < 300  # no hang in the dead process's collective
    newest = out / "checkpoints" / "step-1"
    line = (f"error: process 0 of 2: another process of this run died after step 2 (its own error is above); "
            f"stopping too. The newest checkpoint is {newest}: resume with --resume_from_checkpoint {newest}.")
    assert line in result.stderr.splitlines(), result.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]


def test_a_torch_without_public_fsdp2_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(UserError, match="torch 2.5.1.* install torch 2.6 or newer"):
        refuse_unshardable(parse(["--optim", "adamw_torch"]), LaunchSettings(num_processes=2, fsdp=True))

