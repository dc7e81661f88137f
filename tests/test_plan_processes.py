"""The memory plan per GPU for several processes: data parallel, FSDP2-sharded, FSDP2 with parameter offload."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from qlora_kit.config import parse
from qlora_kit.errors import UserError
from qlora_kit.launch import LaunchSettings, launch_settings
from qlora_kit.memory.apply import plan_for_config, plan_settings, planned_launch
from qlora_kit.memory.budget import (PlanSettings, adapted_linears, lora_tensor_numels, nf4_bytes, nf4_packed_bytes,
                                     nf4_state_bytes, optimizer_state_bytes, weight_bytes)
from qlora_kit.memory.plan import (DDP_BUCKET_SLACK, HOST_BASELINE_BYTES, GiB, format_table, gpu_peak, host_need,
                                   plan_memory)
from qlora_kit.memory.shapes import model_shape

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "recipes" / "chat" / "llama-3.1-70b-2x24gb.yaml"
LAUNCH_ENV = ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_RESHARD_AFTER_FORWARD")


@pytest.fixture(scope="module")
def shape70():
    return model_shape("llama-3.1-70b")


def rows_of(plan):
    return {row.name: row for row in plan.rows}


def fsdp(n=2, offload=False, **kwargs):
    return PlanSettings(num_processes=n, fsdp=True, fsdp_offload_params=offload, optim="adamw_torch", **kwargs)


def test_nf4_bytes_split_into_packed_codes_and_states():
    n = 8192 * 28672
    assert nf4_packed_bytes(n) == n // 2
    assert nf4_packed_bytes(n) + nf4_state_bytes(n) == nf4_bytes(n)
    assert nf4_state_bytes(n) == n // 64 + 4 + 16 * 4 + 4 * (n // 64 // 256) + 256 * 4
    weights = weight_bytes(model_shape("llama-3.1-8b"), 2)
    assert sum(weights.per_layer_params) + sum(weights.per_layer_states) == sum(weights.per_layer)


def test_data_parallel_is_one_process_per_gpu_plus_the_bucket_slack():
    shape = model_shape("llama-3.1-8b")
    one = plan_memory(shape, PlanSettings(max_seq_length=2048), 24 * GiB, 128 * GiB)
    two = plan_memory(shape, PlanSettings(max_seq_length=2048, num_processes=2), 24 * GiB, 128 * GiB)
    assert one.fits and two.fits and two.num_processes == 2 and not two.fsdp
    assert two.predicted_peak_gpu_bytes == one.predicted_peak_gpu_bytes + DDP_BUCKET_SLACK
    gpu_one = {r.name: r.bytes for r in one.rows if r.where != "host"}
    gpu_two = {r.name: r.bytes for r in two.rows if r.where != "host"}
    assert gpu_two == {**gpu_one, "DDP bucket slack": DDP_BUCKET_SLACK}
    assert two.host_ram_bytes == 2 * one.host_ram_bytes  # each process's own host RAM, on one machine
    assert two.explanation.startswith("per GPU, 2 processes, data parallel: fits")
    assert "per GPU, 2 processes, data parallel" in format_table(two)
    assert two.to_dict()["num_processes"] == 2 and two.to_dict()["fsdp"] is False


def test_data_parallel_never_streams_and_points_to_fsdp(shape70):
    alone = plan_memory(shape70, PlanSettings(max_seq_length=2048), 24 * GiB, 128 * GiB)
    assert alone.fits and alone.streamed_layers > 0
    two = plan_memory(shape70, PlanSettings(max_seq_length=2048, num_processes=2), 24 * GiB, 128 * GiB)
    assert not two.fits and two.streamed_layers == 0 and two.resident_layers == 80 and two.layers_in_flight == 0
    assert "does not fit" in two.explanation and "recipes/accelerate/fsdp2.yaml" in two.explanation
    chosen = plan_memory(shape70, PlanSettings(max_seq_length=2048, num_processes=2, resident_layers=20),
                         24 * GiB, 128 * GiB)
    assert not chosen.fits and "layer streaming runs on one process only" in chosen.explanation


def test_fsdp_shards_the_packed_nf4_codes_and_keeps_the_states_whole(shape70):
    weights = weight_bytes(shape70, 2)
    one = plan_memory(shape70, fsdp(n=1, max_seq_length=2048), 80 * GiB, 256 * GiB)
    two = plan_memory(shape70, fsdp(n=2, max_seq_length=2048), 80 * GiB, 256 * GiB)
    rows = rows_of(two)
    packed = sum(nf4_packed_bytes(q.numel) for q in shape70.quantized if q.layer is not None)
    norms = sum(p.numel for p in shape70.unquantized if p.layer is not None) * 2
    assert rows["decoder layers' parameters, 1/2 shard"].bytes == -(-(packed + norms) // 2)
    assert rows["decoder layers' parameters, 1/2 shard"].bytes == rows_of(one)["decoder layers' parameters, 1/1 shard"].bytes // 2
    states = sum(nf4_state_bytes(q.numel) for q in shape70.quantized)
    assert rows["NF4 quantization states, whole"].bytes == states == rows_of(one)["NF4 quantization states, whole"].bytes
    assert rows["embeddings, lm_head, final norm, gathered"].bytes == weights.embeddings + weights.lm_head + weights.other
    numels = lora_tensor_numels(adapted_linears(shape70), 16)
    assert rows["LoRA weights, 1/2 shard"].bytes == sum(numels) * 2 // 2
    assert rows["optimizer states (adamw_torch), 1/2 shard"].bytes == -(-optimizer_state_bytes(numels, "adamw_torch", 2) // 2)
    largest_layer = max(weights.per_layer_params) + sum(numels) * 2 // 80
    assert rows["gathered decoder layers, 2 whole"].bytes == 2 * largest_layer
    assert two.fits and two.streamed_layers == 0
    # the second process takes half of the sharded bytes off each GPU, nothing else
    halved = (packed + norms + weights.embeddings + weights.lm_head + weights.other + 2 * sum(numels) * 2
              + optimizer_state_bytes(numels, "adamw_torch", 2))
    assert one.predicted_peak_gpu_bytes - two.predicted_peak_gpu_bytes == pytest.approx(halved / 2, abs=64)
    assert two.host_ram_bytes == 2 * HOST_BASELINE_BYTES
    assert two.explanation.startswith("per GPU, 2 processes, FSDP2-sharded: fits")


def test_fsdp_offload_moves_the_shards_to_host_ram(shape70):
    on_gpu = plan_memory(shape70, fsdp(max_seq_length=2048), 24 * GiB, 128 * GiB)
    offload = plan_memory(shape70, fsdp(offload=True, max_seq_length=2048), 24 * GiB, 128 * GiB)
    rows = rows_of(offload)
    sharded = ["decoder layers' parameters", "embeddings, lm_head, final norm", "LoRA weights", "LoRA gradients",
               "optimizer states (adamw_torch)"]
    for name in sharded:
        assert rows[f"{name}, 2 shards"].where == "host"
        assert rows[f"{name}, 2 shards"].bytes == pytest.approx(2 * rows_of(on_gpu)[f"{name}, 1/2 shard"].bytes, abs=2)
    assert rows["NF4 quantization states, whole"].where == "gpu"
    assert rows["gathered decoder layers, 2 whole"].where == "gpu"
    moved = sum(rows_of(on_gpu)[f"{name}, 1/2 shard"].bytes for name in sharded)
    same = dict(max_seq_length=2048, offload_activations=False)
    on_gpu_same = plan_memory(shape70, fsdp(**same), 24 * GiB, 128 * GiB)
    offload_same = plan_memory(shape70, fsdp(offload=True, **same), 24 * GiB, 128 * GiB)
    assert gpu_peak(on_gpu_same.rows) - gpu_peak(offload_same.rows) == moved
    assert host_need(offload.rows) == sum(rows[f"{name}, 2 shards"].bytes for name in sharded) + 2 * HOST_BASELINE_BYTES
    assert not on_gpu.fits and "fsdp2-offload.yaml" in on_gpu.explanation
    assert offload.fits and offload.fsdp_offload_params and offload.to_dict()["fsdp"] is True
    assert "parameters offloaded to host RAM" in offload.explanation


def test_fsdp_with_a_bitsandbytes_optimizer_is_explained_as_refused(shape70):
    plan = plan_memory(shape70, dataclasses.replace(fsdp(offload=True), optim="paged_adamw_8bit"), 24 * GiB, 128 * GiB)
    assert not plan.fits
    assert "refused: --optim paged_adamw_8bit" in plan.explanation and "adamw_torch" in plan.explanation
    assert "DTensor" in plan.explanation


def test_fsdp_never_streams(shape70):
    plan = plan_memory(shape70, fsdp(max_seq_length=2048), 8 * GiB, 128 * GiB)
    assert not plan.fits and plan.streamed_layers == 0
    forced = plan_memory(shape70, fsdp(offload=True, resident_layers=10), 24 * GiB, 128 * GiB)
    assert not forced.fits and "layer streaming runs on one process only" in forced.explanation


def clear_launch(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def test_launch_settings_are_read_from_accelerate_environment(monkeypatch):
    clear_launch(monkeypatch)
    assert launch_settings() == LaunchSettings()
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_settings() == LaunchSettings(num_processes=4)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert launch_settings() == LaunchSettings(num_processes=4, fsdp=True, offload_params=True)
    settings = plan_settings(parse(["--model_name_or_path", "m"]), "bfloat16", "bfloat16")
    assert (settings.num_processes, settings.fsdp, settings.fsdp_offload_params) == (4, True, True)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP version 1"):
        launch_settings()
    with pytest.raises(UserError, match="FSDP version 1"):
        plan_settings(parse(["--model_name_or_path", "m"]), "bfloat16", "bfloat16")


def test_planning_overrides_win_over_the_launch(monkeypatch):
    clear_launch(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "8")
    base = ["--model_name_or_path", "m"]
    assert planned_launch(parse(base)) == LaunchSettings(num_processes=8)
    assert planned_launch(parse(base + ["--plan_num_processes", "2"])) == LaunchSettings(num_processes=2)
    assert planned_launch(parse(base + ["--plan_fsdp", "offload"])) == LaunchSettings(8, fsdp=True, offload_params=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # not read: both are given
    both = parse(base + ["--plan_num_processes", "2", "--plan_fsdp", "false"])
    assert planned_launch(both) == LaunchSettings(num_processes=2)
    with pytest.raises(UserError, match="plan_num_processes"):
        parse(base + ["--plan_num_processes", "-1"])
    with pytest.raises(UserError, match="invalid choice"):
        parse(base + ["--plan_fsdp", "maybe"])


def test_the_2x24gb_preset_fits_24_gib_per_gpu_by_the_plan(monkeypatch):
    launch = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2-offload.yaml").read_text())
    assert launch["num_processes"] == 2 and launch["fsdp_config"]["fsdp_version"] == 2
    assert launch["fsdp_config"]["fsdp_offload_params"] is True
    assert "--config_file recipes/accelerate/fsdp2-offload.yaml" in PRESET.read_text().splitlines()[0]
    clear_launch(monkeypatch)  # what accelerate launch sets from that configuration
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    config = parse(["--config", str(PRESET), "--model_name_or_path", "llama-3.1-70b"])
    assert config.train.optim == "adamw_torch" and config.stream.resident_layers == -1
    plan = plan_for_config(config, "bfloat16", "bfloat16", 24 * GiB, 64 * GiB)
    assert plan.fits, plan.explanation
    assert plan.num_processes == 2 and plan.fsdp and plan.fsdp_offload_params and plan.streamed_layers == 0
    assert plan.predicted_peak_gpu_bytes <= 24 * GiB and plan.host_ram_bytes <= 64 * GiB
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")  # the halves alone do not leave room on 24 GiB
    assert not plan_for_config(config, "bfloat16", "bfloat16", 24 * GiB, 64 * GiB).fits


def test_each_process_offloads_its_own_hidden_states():
    from qlora_kit.memory.apply import _layer_inputs_bytes

    shape = model_shape("llama-3.1-8b")
    one = plan_memory(shape, PlanSettings(max_seq_length=2048, offload_activations=True), 24 * GiB, 128 * GiB)
    two = plan_memory(shape, PlanSettings(max_seq_length=2048, offload_activations=True, num_processes=2),
                      24 * GiB, 128 * GiB)
    assert rows_of(two)["checkpointed hidden states"].bytes == 2 * rows_of(one)["checkpointed hidden states"].bytes
    assert _layer_inputs_bytes(two) == _layer_inputs_bytes(one) == 32 * 2048 * 4096 * 2
