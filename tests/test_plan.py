"""The memory planner's arithmetic, by hand, and the plans it makes from config.json alone."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli import run_main
from qlora_kit.errors import UserError, exit_on_user_error
from qlora_kit.memory.apply import plan_command
from qlora_kit.memory import activations as act
from qlora_kit.memory.budget import (PlanSettings, adapted_linears, lora_tensor_numels, nf4_bytes,
                                     optimizer_state_bytes, weight_bytes)
from qlora_kit.memory.plan import GiB, budget_rows, format_table, gpu_peak, parse_memory_size, plan_memory
from qlora_kit.memory.shapes import model_shape, shape_from_model, meta_model
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
H, I, LAYERS, HEADS, KV, V, HD = 64, 128, 2, 4, 2, 512, 16  # tiny_models' llama: head_dim 64 / 4


@pytest.fixture(scope="module")
def tiny_shape():
    config = tiny_config("llama")
    return shape_from_model(meta_model(config), config)


def test_nf4_bytes_by_hand():
    # 64 x 128 weights: 4096 packed bytes, 128 uint8 absmax, 1 fp32 offset, 16 fp32 code,
    # ceil(128/256) = 1 fp32 second-level absmax, 256 fp32 dynamic code.
    assert nf4_bytes(64 * 128) == 4096 + 128 + 4 + 64 + 4 + 1024
    assert nf4_bytes(64 * 128, double_quant=False) == 4096 + 128 * 4 + 64
    # The QLoRA paper's 4.127 bits per weight, for a large layer.
    n = 8192 * 28672
    assert nf4_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


def test_tiny_llama_weights_by_hand(tiny_shape):
    q, kv = HEADS * HD, KV * HD
    projections = [(H, q), (H, kv), (H, kv), (q, H), (H, I), (H, I), (I, H)]
    per_layer = sum(nf4_bytes(a * b) for a, b in projections) + 2 * H * 2  # two bf16 norms
    weights = weight_bytes(tiny_shape, compute_bytes=2)
    assert weights.per_layer == [per_layer] * LAYERS
    assert weights.embeddings == V * H * 2 and weights.lm_head == V * H * 2  # llama: not tied
    assert weights.other == H * 2  # the final norm
    assert tiny_shape.total_params == LAYERS * (sum(a * b for a, b in projections) + 2 * H) + 2 * V * H + H


def test_lora_and_optimizer_states_by_hand(tiny_shape):
    r = 8
    numels = lora_tensor_numels(adapted_linears(tiny_shape, "all"), r)
    q, kv = HEADS * HD, KV * HD
    per_layer = [r * H, q * r, r * H, kv * r, r * H, kv * r, r * q, H * r, r * H, I * r, r * H, I * r, r * I, H * r]
    assert numels == per_layer * LAYERS
    total = sum(numels)
    assert optimizer_state_bytes(numels, "adamw_torch", 2) == 2 * 2 * total + 4 * len(numels)
    assert optimizer_state_bytes(numels, "paged_adamw_32bit", 2) == 8 * total
    # Every tensor here is under bitsandbytes' min_8bit_size of 4096 elements: 32-bit state, no code books.
    assert optimizer_state_bytes(numels, "adamw_8bit", 2) == 8 * total
    big = [16 * 4096, 14336 * 16]
    assert optimizer_state_bytes(big, "adamw_8bit", 2) == sum(2 * n + 8 * math.ceil(n / 256) for n in big) + 2048


def test_named_targets_adapt_only_those(tiny_shape):
    names = sorted({a.name.split(".")[-1] for a in adapted_linears(tiny_shape, "q_proj,v_proj")})
    assert names == ["q_proj", "v_proj"]


def test_activation_rows_by_hand(tiny_shape):
    s = PlanSettings(micro_batch_size=2, max_seq_length=32, compute_dtype="bfloat16", lora_r=8, lora_dropout=0.0,
                    padded_batches=False)
    N, q, kv = 64, HEADS * HD, KV * HD
    assert act.checkpoint_bytes(tiny_shape, s) == N * H * 2
    norms = 2 * (4 * H + 4)
    attention = 2 * (q + 2 * kv) + 2 * q + 4 * HEADS
    mlp = 3 * I * 2
    inputs = 2 * H + 2 * H + 2 * I + 7 * 8 * 2  # attention and MLP inputs, the MLP product, LoRA A outputs
    assert act.layer_saved_bytes(tiny_shape, s) == N * (norms + attention + mlp + inputs)
    # 12 bytes per logit at the peak (backward); chunked: one chunk of 16 and the gathered positions.
    assert act.loss_bytes(tiny_shape, s, chunk_size=0) == N * V * 12
    assert act.loss_bytes(tiny_shape, s, chunk_size=16) == 16 * V * 12 + N * H * 2


@pytest.mark.parametrize("name, billions", [
    ("llama-3.1-8b", 8.030), ("llama-3.1-70b", 70.554), ("qwen2.5-7b", 7.616), ("qwen2.5-72b", 72.706),
    ("mistral-7b", 7.248), ("gemma-2-9b", 9.242),
])
def test_shipped_shapes_have_the_published_sizes(name, billions):
    assert model_shape(name).total_params / 1e9 == pytest.approx(billions, abs=5e-4)


def test_llama_70b_on_24_and_48_gib():
    shape = model_shape("llama-3.1-70b")
    settings = PlanSettings(max_seq_length=4096)
    small = plan_memory(shape, settings, 24 * GiB, 128 * GiB)
    assert small.fits and small.streamed_layers > 0 and small.offload_activations
    assert small.resident_layers + small.streamed_layers == 80 and small.layers_in_flight == 2
    assert small.predicted_peak_gpu_bytes <= 24 * GiB < 128 * GiB and small.host_ram_bytes > small.layer_bytes
    large = plan_memory(shape, settings, 48 * GiB, 128 * GiB)
    assert large.fits and large.streamed_layers == 0
    table = format_table(large)
    assert "decoder layers, 80 of 80 resident" in table and "GPU peak" in table


def test_the_plan_prefers_resident_layers_then_offload_then_streaming():
    shape = model_shape("llama-3.1-8b")
    settings = PlanSettings(max_seq_length=4096)
    roomy = plan_memory(shape, settings, 80 * GiB, 64 * GiB)
    assert roomy.fits and not roomy.offload_activations and roomy.streamed_layers == 0
    offloaded = plan_memory(shape, PlanSettings(max_seq_length=4096, offload_activations=True), 80 * GiB, 64 * GiB)
    between = (roomy.predicted_peak_gpu_bytes + offloaded.predicted_peak_gpu_bytes) // 2
    tight = plan_memory(shape, settings, between, 64 * GiB)
    assert tight.fits and tight.offload_activations and tight.streamed_layers == 0
    forced = plan_memory(shape, PlanSettings(max_seq_length=4096, offload_activations=False), between, 64 * GiB)
    assert forced.fits and forced.streamed_layers > 0 and not forced.offload_activations


def test_nothing_fits_says_what_is_missing():
    plan = plan_memory(model_shape("llama-3.1-70b"), PlanSettings(max_seq_length=4096), 8 * GiB, 128 * GiB)
    assert not plan.fits and plan.max_micro_batch_size == 0
    assert "does not fit" in plan.explanation and "GPU memory" in plan.explanation
    short_host = plan_memory(model_shape("llama-3.1-70b"), PlanSettings(max_seq_length=4096), 24 * GiB, 16 * GiB)
    assert not short_host.fits and "host RAM" in short_host.explanation


def test_largest_batch_and_sequence_that_fit():
    shape = model_shape("llama-3.1-8b")
    plan = plan_memory(shape, PlanSettings(micro_batch_size=1, max_seq_length=2048), 24 * GiB, 64 * GiB)
    assert plan.max_micro_batch_size > 1 and plan.max_seq_length_at_batch_1 > 2048

    def peak(batch, seq):
        settings = PlanSettings(micro_batch_size=batch, max_seq_length=seq)
        return gpu_peak(budget_rows(shape, settings, plan.resident_layers, plan.offload_activations, plan.loss_chunk_size))

    assert peak(plan.max_micro_batch_size, 2048) <= 24 * GiB < peak(plan.max_micro_batch_size + 1, 2048)
    assert peak(1, plan.max_seq_length_at_batch_1) <= 24 * GiB < peak(1, plan.max_seq_length_at_batch_1 + 1)


def test_memory_sizes():
    assert parse_memory_size("24GiB") == 24 * 2**30
    assert parse_memory_size("80GB") == 80 * 10**9
    assert parse_memory_size("1.5 gib") == int(1.5 * 2**30)
    with pytest.raises(UserError, match="with a unit"):
        parse_memory_size("24")


def test_plan_memory_tool_prints_json_and_exits_by_fit(capsys):
    command = [sys.executable, "tools/plan_memory.py", "--model", "llama-3.1-70b", "--gpu_memory", "24GiB",
               "--host_memory", "128GiB", "--max_seq_length", "4096", "--per_device_train_batch_size", "1", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["fits"] and plan["streamed_layers"] > 0 and plan["model"] == "llama-3.1-70b"
    assert {"resident_layers", "layers_in_flight", "loss_chunk_size", "host_ram_bytes", "rows"} <= set(plan)
    too_small = run_main(exit_on_user_error(plan_command), capsys, *command[2:5], "2GiB", *command[6:-1])  # in-process
    assert too_small.returncode == 1 and "does not fit" in too_small.stdout


def test_streaming_follows_the_plan_unless_resident_layers_is_set():
    from qlora_kit.config import StreamArguments
    from qlora_kit.memory.apply import stream_arguments

    shape = model_shape("llama-3.1-70b")
    planned = plan_memory(shape, PlanSettings(max_seq_length=4096), 24 * GiB, 128 * GiB)
    assert planned.streamed_layers > 0
    stream = stream_arguments(StreamArguments(), planned)
    assert stream.resident_layers == planned.resident_layers and stream.layers_in_flight == planned.layers_in_flight
    chosen = plan_memory(shape, PlanSettings(max_seq_length=4096, resident_layers=10), 24 * GiB, 128 * GiB)
    assert chosen.fits and chosen.resident_layers == 10 and chosen.streamed_layers == 70
    assert stream_arguments(StreamArguments(resident_layers=10), chosen).resident_layers == 10
    everything = plan_memory(shape, PlanSettings(max_seq_length=4096), 80 * GiB, 128 * GiB)
    assert everything.streamed_layers == 0 and stream_arguments(StreamArguments(), everything).resident_layers == -1


def test_layer_major_inputs_wait_in_host_ram_and_nothing_is_offloaded():
    """Streamed layers with 8 micro-batches a step: every micro-batch's layer inputs are held in host RAM."""
    shape = model_shape("llama-3.1-70b")
    one = 2048 * 8192 * 2  # one layer input of 2048 tokens, bf16
    plain = plan_memory(shape, PlanSettings(max_seq_length=2048), 24 * GiB, 128 * GiB)
    layer_major = plan_memory(shape, PlanSettings(max_seq_length=2048, layer_major_micro_batches=8), 24 * GiB, 128 * GiB)
    assert plain.layer_major_micro_batches == 1 and layer_major.layer_major_micro_batches == 8
    rows = {row.name: row for row in layer_major.rows}
    assert rows["layer-major boundary hidden states"].bytes == 8 * 80 * one
    assert rows["layer-major boundary hidden states"].where == "host"
    assert not layer_major.offload_activations and "checkpointed hidden states" not in rows
    assert layer_major.host_ram_bytes - plain.host_ram_bytes >= 8 * 80 * one - 80 * one - one
    assert "go through each layer together" in layer_major.explanation
    resident = plan_memory(shape, PlanSettings(max_seq_length=2048, layer_major_micro_batches=8), 80 * GiB, 128 * GiB)
    assert resident.streamed_layers == 0 and resident.layer_major_micro_batches == 1  # nothing streams: plain order


def test_the_recipe_plans_layer_major_steps_as_it_runs_them():
    from qlora_kit.config import parse
    from qlora_kit.memory.apply import plan_settings

    base = ["--model_name_or_path", "m", "--gradient_accumulation_steps", "4"]
    assert plan_settings(parse(base), "bfloat16", "bfloat16").layer_major_micro_batches == 4
    off = parse(base + ["--layer_major_accumulation", "false"])
    assert plan_settings(off, "bfloat16", "bfloat16").layer_major_micro_batches == 1
