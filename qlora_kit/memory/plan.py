"""The memory planner: a budget table and a plan per GPU, from config.json alone.

`plan_memory(shape, settings, gpu_bytes, host_bytes)` returns a `MemoryPlan`. Its fields, which the
recipe and the layer streaming of the frozen base rely on:
  fits                      bool: the chosen plan fits the card and the host RAM
  gpu_bytes                 the card's memory the plan was made for
  resident_layers           decoder layers whose NF4 weights stay on the GPU
  streamed_layers           decoder layers held in pinned host RAM and streamed in for each pass
  layers_in_flight          streamed layers on the GPU at once (one computing, one arriving), 0 if none
  layer_bytes               bytes of the largest decoder layer (NF4 weights, their state, norms, biases)
  offload_activations       bool: checkpointed hidden states go to pinned host RAM (memory/offload.py)
  loss_chunk_size           trained tokens per loss chunk (0: the plain loss over full logits)
  micro_batch_size, max_seq_length   the run's shape the plan was made for
  layer_major_micro_batches micro-batches a step runs through each layer together (layers stream and
                            --layer_major_accumulation is on: their layer inputs wait in host RAM); 1 if not
  predicted_peak_gpu_bytes  everything on the card at the step's peak, CUDA context included
  predicted_allocator_bytes the same less the CUDA context and paged optimizer states: what
                            `torch.cuda.max_memory_reserved()` should show
  load_peak_gpu_bytes       the peak while loading (resident weights + one unquantized tensor)
  host_ram_bytes            host RAM the plan needs (process, streamed layers, offloaded activations
                            or layer-major boundaries)
  host_ram_available        host RAM the plan was checked against
  max_micro_batch_size      the largest micro-batch that fits at max_seq_length with this plan (0: none)
  max_seq_length_at_batch_1 the longest sequence that fits at micro-batch 1 (0: none)
  rows                      the budget table: `BudgetRow(name, bytes, where, how)`; where is "gpu",
                            "host", or "gpu, layer backward" / "gpu, loss" for the two phases of
                            which only the larger counts at the peak
  explanation               what was chosen and why, or what is missing
  num_processes, fsdp, fsdp_offload_params   the launch the plan is for: one process, N data-parallel
                            processes (each GPU holds everything), or N processes of FSDP2 (sharded)

The choice: keep every layer resident and activations on the GPU if that fits (fastest); else
offload activations (one hidden state per layer crosses PCIe twice per step, cheap); else stream
the fewest decoder layers that makes it fit (a layer's weights cross PCIe twice per step). Explicit
user settings (offload, chunk size, resident layers) are kept and only checked.

Several processes (`PlanSettings.num_processes`, `fsdp`): the figures are per GPU, host RAM is the
machine's (all processes together). Data parallel: each GPU holds what one process holds, plus
DDP's bucket slack (the buckets are the LoRA gradients, `gradient_as_bucket_view`); layer streaming
runs on one process only, so the planner does not choose it. FSDP2: the decoder layers' parameters
(packed NF4 codes, norms, biases), the LoRA weights, their gradients and optimizer states are split
1/N per GPU (or wait in host RAM with `fsdp_offload_params`); the NF4 quantization states stay whole
(they are not parameters); two decoder layers (the one computing, the one prefetched) and the
embeddings, final norm and lm_head are gathered whole; one layer's LoRA gradients are whole before
their reduce-scatter. Under FSDP only `adamw_torch` can step the sharded parameters.

The peak is static bytes (weights, LoRA weights, gradients, optimizer states) + the checkpointed
hidden states + the larger of two phases: one layer's recompute and backward, or the final hidden
states with the logits and loss. See budget.py and activations.py for the arithmetic of each row.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from qlora_kit.errors import UserError
from qlora_kit.launch import LaunchSettings

from qlora_kit.memory import activations as act
from qlora_kit.memory.budget import (PlanSettings, WeightBytes, adapted_linears, lora_tensor_numels,
                                     optimizer_state_bytes, paged_state_bytes, weight_bytes)
from qlora_kit.memory.shapes import ModelShape
from qlora_kit.train.loss import planned_chunk_size

GiB = 1024**3
MiB = 1024**2
CUDA_CONTEXT_BYTES = 768 * MiB   # CUDA context, cuBLAS and bitsandbytes kernels: outside torch's allocator
HOST_BASELINE_BYTES = 4 * GiB     # the Python process with torch, transformers and the CUDA libraries
ALLOCATOR_SLACK = 0.05            # caching-allocator rounding and fragmentation, on the activations
CUBLAS_WORKSPACES = 2 * 32 * MiB  # one 32 MiB cuBLAS workspace for the forward thread, one for autograd's
LAYERS_IN_FLIGHT = 2
DDP_BUCKET_SLACK = 25 * MiB       # DDP's buckets are views of the gradients (gradient_as_bucket_view): slack only
FSDP_OPTIM = "adamw_torch"        # bitsandbytes' optimizers fail on FSDP's sharded (DTensor) parameters
PHASES = ("gpu, layer backward", "gpu, loss")


@dataclass
class BudgetRow:
    """One row of the budget table: what, how many bytes, where it lives, and the arithmetic."""

    name: str
    bytes: int
    where: str
    how: str


@dataclass
class MemoryPlan:
    """The plan for one run, per GPU; the fields are described in the module docstring."""

    fits: bool
    gpu_bytes: int
    resident_layers: int
    streamed_layers: int
    layers_in_flight: int
    layer_bytes: int
    offload_activations: bool
    loss_chunk_size: int
    micro_batch_size: int
    max_seq_length: int
    predicted_peak_gpu_bytes: int
    predicted_allocator_bytes: int
    load_peak_gpu_bytes: int
    host_ram_bytes: int
    host_ram_available: int
    layer_major_micro_batches: int = 1
    max_micro_batch_size: int = 0
    max_seq_length_at_batch_1: int = 0
    rows: list[BudgetRow] = field(default_factory=list)
    explanation: str = ""
    num_processes: int = 1
    fsdp: bool = False
    fsdp_offload_params: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory_size(text: str, field_name: str = "size") -> int:
    """Bytes of a size such as 24GiB (binary), 80GB (decimal) or 512MiB; a unit is required."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in UNITS:
        raise UserError(f"{field_name} must be a size with a unit, such as 24GiB, 80GB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * UNITS[unit])


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _static_rows(shape: ModelShape, s: PlanSettings, resident: int) -> list[BudgetRow]:
    d = s.compute_bytes
    weights = weight_bytes(shape, d, s.double_quant)
    streamed = shape.num_layers - resident
    largest = max(weights.per_layer)
    linears = adapted_linears(shape, s.lora_target_modules)
    numels = lora_tensor_numels(linears, s.lora_r, s.use_dora)
    lora = sum(numels) * s.lora_bytes
    per_param = weights.quantized_params and (sum(weights.per_layer) / weights.quantized_params)
    rows = [
        BudgetRow(f"decoder layers, {resident} of {shape.num_layers} resident", sum(weights.per_layer[:resident]), "gpu",
                  f"NF4 {per_param:.4f} B/param (4 bits + 8-bit absmax per 64 + fp32 per 256 blocks) with norms"),
        BudgetRow("embeddings", weights.embeddings, "gpu", f"{shape.vocab_size} x {shape.hidden_size} x {d} B"
                  + (" (lm_head tied)" if shape.tied_embeddings else "")),
        BudgetRow("lm_head", weights.lm_head, "gpu", f"{shape.vocab_size} x {shape.hidden_size} x {d} B"),
        BudgetRow("final norm", weights.other, "gpu", "compute dtype"),
        BudgetRow("LoRA weights", lora, "gpu", f"{len(linears)} layers x r={s.lora_r} x (in + out) x {s.lora_bytes} B"),
        BudgetRow("LoRA gradients", lora, "gpu", "same shapes and dtype as the weights"),
        BudgetRow(f"optimizer states ({s.optim})", optimizer_state_bytes(numels, s.optim, s.lora_bytes), "gpu",
                  "2 x uint8 + fp32 absmax per 256" if s.optim.endswith("8bit") else "2 states per weight"),
    ]
    if streamed:
        rows += [
            BudgetRow(f"streaming buffers, {LAYERS_IN_FLIGHT} layers in flight", LAYERS_IN_FLIGHT * largest, "gpu",
                      f"{LAYERS_IN_FLIGHT} x the largest layer"),
            BudgetRow(f"streamed decoder layers ({streamed})", sum(weights.per_layer[resident:]), "host",
                      "pinned host RAM"),
        ]
    if s.num_processes > 1:
        rows.append(BudgetRow("DDP bucket slack", DDP_BUCKET_SLACK, "gpu",
                              "gradient_as_bucket_view: the buckets are the LoRA gradients"))
    return rows


def _lora_bytes_by_layer(shape: ModelShape, s: PlanSettings) -> tuple[list[int], int]:
    """LoRA weight bytes of each decoder layer, and of LoRA outside the layers (lm_head when named)."""
    per_layer, outside = [0] * shape.num_layers, 0
    for linear in adapted_linears(shape, s.lora_target_modules):
        size = sum(lora_tensor_numels([linear], s.lora_r, s.use_dora)) * s.lora_bytes
        if linear.layer is None:
            outside += size
        else:
            per_layer[linear.layer] += size
    return per_layer, outside


def _root_bytes(weights: WeightBytes) -> int:
    """Embeddings, lm_head, final norm: the parameters outside the decoder layers (the root FSDP unit)."""
    return weights.embeddings + weights.lm_head + weights.other - weights.other_states


def _sharded_rows(shape: ModelShape, s: PlanSettings) -> list[BudgetRow]:
    """FSDP2, per GPU: parameters, LoRA, gradients and optimizer states split 1/N (or in host RAM with offload)."""
    n = s.num_processes
    weights = weight_bytes(shape, s.compute_bytes, s.double_quant)
    lora_layers, lora_outside = _lora_bytes_by_layer(shape, s)
    linears = adapted_linears(shape, s.lora_target_modules)
    numels = lora_tensor_numels(linears, s.lora_r, s.use_dora)
    lora = sum(lora_layers) + lora_outside
    root = _root_bytes(weights)

    def shard(name: str, total: int, how: str) -> BudgetRow:
        if s.fsdp_offload_params:  # every process's 1/N in the machine's RAM: the whole once
            return BudgetRow(f"{name}, {n} shards", total, "host", f"{how}; FSDP offload: host RAM of all processes")
        return BudgetRow(f"{name}, 1/{n} shard", -(-total // n), "gpu", f"{how}; / {n} processes")

    gathered = max(p + lo for p, lo in zip(weights.per_layer_params, lora_layers))
    return [
        shard("decoder layers' parameters", sum(weights.per_layer_params),
              "packed NF4 codes (4 bits/param, stored in the compute dtype), norms, biases"),
        BudgetRow("NF4 quantization states, whole", sum(weights.per_layer_states) + weights.other_states, "gpu",
                  "absmax, nested absmax, code books: on the modules, not parameters, so not sharded"),
        shard("embeddings, lm_head, final norm", root, "at rest"),
        BudgetRow("embeddings, lm_head, final norm, gathered", root + lora_outside, "gpu",
                  "whole from the first layer to the loss"),
        BudgetRow(f"gathered decoder layers, {LAYERS_IN_FLIGHT} whole", LAYERS_IN_FLIGHT * gathered, "gpu",
                  "the layer computing and the one prefetched: parameters and LoRA weights"),
        shard("LoRA weights", lora, f"{len(linears)} layers x r={s.lora_r} x (in + out) x {s.lora_bytes} B"),
        shard("LoRA gradients", lora, "same shapes and dtype as the weights"),
        shard(f"optimizer states ({s.optim})", optimizer_state_bytes(numels, s.optim, s.lora_bytes),
              "2 states per weight"),
        BudgetRow("gradient reduce-scatter buffer", max(lora_layers + [lora_outside]), "gpu",
                  "one layer's LoRA gradients whole"),
    ]


def _layer_major(shape: ModelShape, s: PlanSettings, resident: int) -> int:
    """Micro-batches that go through each layer together (memory/reorder.py); 1 in the plain order."""
    return s.layer_major_micro_batches if resident < shape.num_layers else 1


def _activation_rows(shape: ModelShape, s: PlanSettings, offload: bool, chunk: int, resident: int) -> list[BudgetRow]:
    d, L, N = s.compute_bytes, shape.num_layers, s.tokens
    one = act.checkpoint_bytes(shape, s)
    saved = act.layer_saved_bytes(shape, s)
    M = _layer_major(shape, s, resident)
    rows = []
    if M > 1:  # no checkpoints: every micro-batch's layer inputs wait on the host; each layer is recomputed
        rows += [BudgetRow("layer-major boundary hidden states", M * L * one, "host",
                           f"pinned: {M} micro-batches x {L} layer inputs x {N} tokens x {shape.hidden_size} x {d} B"),
                 BudgetRow("layer-major hidden states in flight", (M + 2) * one, "gpu",
                           f"{M} micro-batches' boundaries (or their gradients) + a layer input and its gradient")]
    elif not s.gradient_checkpointing:
        rows.append(BudgetRow("saved activations, every layer", L * (saved + one), "gpu",
                              f"{L} x (layer input + what autograd keeps)"))
    elif offload:
        rows += [BudgetRow("checkpointed hidden states", L * one, "host", f"pinned: {L} x {N} tokens x {shape.hidden_size} x {d} B"),
                 BudgetRow("offloaded hidden states in flight", 2 * one, "gpu", "2 layer inputs")]
    else:
        rows.append(BudgetRow("checkpointed hidden states", L * one, "gpu", f"{L} x {N} tokens x {shape.hidden_size} x {d} B"))
    rows.append(BudgetRow("padding mask", act.attention_mask_bytes(shape, s), "gpu", "B x T x T bool"))
    layer = act.layer_backward_bytes(shape, s) + (saved if s.gradient_checkpointing or M > 1 else 0)
    rows.append(BudgetRow("one layer's recompute + backward", layer, PHASES[0],
                          f"saved {gib(saved)} + gradients and a dequantized weight"))
    loss = act.final_hidden_bytes(shape, s) + act.loss_bytes(shape, s, chunk)
    how = f"full logits: {N} x {shape.vocab_size} x 12+ B" if chunk == 0 else f"chunks of {chunk} tokens x {shape.vocab_size} x 12+ B"
    rows.append(BudgetRow("final hidden states + logits and loss", loss, PHASES[1], how))
    return rows


def _phase_peak(rows: list[BudgetRow]) -> int:
    return max((r.bytes for r in rows if r.where in PHASES), default=0)


def _slack(rows: list[BudgetRow]) -> int:
    dynamic = sum(r.bytes for r in rows if r.where == "gpu" and ("hidden" in r.name or "activations" in r.name))
    return int(ALLOCATOR_SLACK * (dynamic + _phase_peak(rows)))


def budget_rows(shape: ModelShape, s: PlanSettings, resident: int, offload: bool, chunk: int) -> list[BudgetRow]:
    """The full budget table of one candidate plan."""
    static = _sharded_rows(shape, s) if s.fsdp else _static_rows(shape, s, resident)
    own = _activation_rows(shape, s, offload, chunk, resident)
    own.append(BudgetRow("allocator slack", _slack(own), "gpu", f"{ALLOCATOR_SLACK:.0%} of the activations"))
    own.append(BudgetRow("cuBLAS workspaces", CUBLAS_WORKSPACES, "gpu", "32 MiB each for the forward and backward threads"))
    own.append(BudgetRow("CUDA context and kernels", CUDA_CONTEXT_BYTES, "gpu", "outside torch's allocator"))
    own.append(BudgetRow("Python, torch and CUDA libraries", HOST_BASELINE_BYTES, "host", "the process itself"))
    if not s.fsdp:  # each data-parallel process holds all of its rows; FSDP's host shards are counted whole already
        static, own = [], static + own
    return static + [_for_every_process(row, s.num_processes) for row in own]


def _for_every_process(row: BudgetRow, n: int) -> BudgetRow:
    """A row each process holds: on its own GPU once, in the machine's host RAM n times."""
    if row.where != "host" or n == 1:
        return row
    return dataclasses.replace(row, bytes=n * row.bytes, how=f"{row.how}; x {n} processes")


def gpu_peak(rows: list[BudgetRow]) -> int:
    """Bytes on the card at the step's peak: every GPU row plus the larger phase."""
    return sum(r.bytes for r in rows if r.where == "gpu") + _phase_peak(rows)


def host_need(rows: list[BudgetRow]) -> int:
    return sum(r.bytes for r in rows if r.where == "host")


def load_peak(shape: ModelShape, s: PlanSettings, resident: int) -> int:
    """Loading: the resident weights plus the largest tensor materialised unquantized before quantizing.

    Under FSDP each process keeps its shards (none with offload), the quantization states, and the
    layer being quantized whole.
    """
    weights = weight_bytes(shape, s.compute_bytes, s.double_quant)
    largest = max([p.numel for p in shape.unquantized] + [q.numel for q in shape.quantized]) * s.compute_bytes
    if not s.fsdp:
        kept = sum(weights.per_layer[:resident]) + weights.total - sum(weights.per_layer)
        return kept + largest + CUDA_CONTEXT_BYTES
    shards = 0 if s.fsdp_offload_params else -(-(sum(weights.per_layer_params) + _root_bytes(weights)) // s.num_processes)
    states = sum(weights.per_layer_states) + weights.other_states
    return shards + states + max(weights.per_layer) + largest + CUDA_CONTEXT_BYTES


def _shortfall(shape: ModelShape, s: PlanSettings, resident: int, offload: bool, chunk: int, gpu: int, host: int) -> int:
    """Bytes missing for a candidate plan (GPU, loading and host together); 0 when it fits."""
    rows = budget_rows(shape, s, resident, offload, chunk)
    gpu_need = max(gpu_peak(rows), load_peak(shape, s, resident))
    return max(0, gpu_need - gpu) + max(0, host_need(rows) - host)


def _fits(shape: ModelShape, s: PlanSettings, resident: int, offload: bool, chunk: int, gpu: int, host: int) -> bool:
    return _shortfall(shape, s, resident, offload, chunk, gpu, host) == 0


def _candidates(shape: ModelShape, s: PlanSettings) -> list[tuple[int, bool]]:
    """(resident layers, offload) in order of preference: fastest first."""
    L = shape.num_layers
    if s.resident_layers is not None:
        residents = [min(s.resident_layers, L)]
    elif s.fsdp or s.num_processes > 1:  # layer streaming runs on one process only
        residents = [L]
    else:
        residents = range(L, -1, -1)
    if not s.gradient_checkpointing:
        return [(r, False) for r in residents]
    if s.offload_activations is not None:
        return [(r, s.offload_activations) for r in residents]
    pairs = [(residents[0], False)] + [(r, True) for r in residents]
    # a step that runs layer-major keeps no checkpoints, so there is nothing to offload
    return list(dict.fromkeys((r, offload and _layer_major(shape, s, r) == 1) for r, offload in pairs))


def _largest(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), assuming fits is monotone; 0 if none."""
    if not fits(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def refusals(shape: ModelShape, s: PlanSettings) -> list[str]:
    """Why the recipe would refuse these settings with this launch, whatever the memory; empty when it would not."""
    reasons = []
    if s.fsdp and s.optim != FSDP_OPTIM:
        reasons.append(f"--optim {s.optim} cannot step FSDP's sharded parameters (bitsandbytes' optimizers fail on "
                       f"them: got mixed torch.Tensor and DTensor): use --optim {FSDP_OPTIM}")
    several = s.fsdp or s.num_processes > 1
    if several and s.resident_layers is not None and s.resident_layers < shape.num_layers:
        reasons.append(f"--resident_layers {s.resident_layers} streams decoder layers, and layer streaming runs on "
                       f"one process only")
    return reasons


def plan_memory(shape: ModelShape, settings: PlanSettings, gpu_bytes: int, host_bytes: int,
                max_position: Optional[int] = None) -> MemoryPlan:
    """Choose what stays on each GPU for this run on these cards, and say whether it fits."""
    s = settings
    chunk = planned_chunk_size(shape.model_type, shape.vocab_size, s.loss_chunk_size)
    shortfalls = [(_shortfall(shape, s, r, o, chunk, gpu_bytes, host_bytes), (r, o))
                  for r, o in _candidates(shape, s)]
    chosen = next((candidate for short, candidate in shortfalls if short == 0), None)
    refused = refusals(shape, s)
    fits = chosen is not None and not refused
    resident, offload = chosen if chosen is not None else min(shortfalls, key=lambda item: item[0])[1]
    rows = budget_rows(shape, s, resident, offload, chunk)
    peak = gpu_peak(rows)
    paged = paged_state_bytes(lora_tensor_numels(adapted_linears(shape, s.lora_target_modules), s.lora_r, s.use_dora),
                              s.optim, s.lora_bytes)
    largest_layer = max(weight_bytes(shape, s.compute_bytes, s.double_quant).per_layer)

    def fits_with(**change) -> bool:
        return _fits(shape, dataclasses.replace(s, **change), resident, offload, chunk, gpu_bytes, host_bytes)

    plan = MemoryPlan(
        fits=fits, gpu_bytes=gpu_bytes, resident_layers=resident, streamed_layers=shape.num_layers - resident,
        layers_in_flight=LAYERS_IN_FLIGHT if resident < shape.num_layers else 0, layer_bytes=largest_layer,
        offload_activations=offload, loss_chunk_size=chunk, micro_batch_size=s.micro_batch_size,
        layer_major_micro_batches=_layer_major(shape, s, resident),
        max_seq_length=s.max_seq_length, predicted_peak_gpu_bytes=peak,
        predicted_allocator_bytes=peak - CUDA_CONTEXT_BYTES - paged,
        load_peak_gpu_bytes=load_peak(shape, s, resident), host_ram_bytes=host_need(rows),
        host_ram_available=host_bytes,
        max_micro_batch_size=_largest(lambda b: fits_with(micro_batch_size=b), 1, 4096),
        max_seq_length_at_batch_1=_largest(lambda t: fits_with(micro_batch_size=1, max_seq_length=t), 2,
                                           max_position or 1 << 20),
        rows=rows, num_processes=s.num_processes, fsdp=s.fsdp, fsdp_offload_params=s.fsdp_offload_params,
    )
    plan.explanation = explain(plan, shape, refused, memory_fits=chosen is not None)
    return plan


def describe_launch(plan: MemoryPlan) -> str:
    """The processes the plan is for, such as 'per GPU, 2 processes, FSDP2-sharded'; '' for one plain process."""
    if plan.num_processes == 1 and not plan.fsdp:
        return ""
    return "per GPU, " + LaunchSettings(plan.num_processes, plan.fsdp, plan.fsdp_offload_params).describe()


def explain(plan: MemoryPlan, shape: ModelShape, refused: Sequence[str] = (), memory_fits: Optional[bool] = None) -> str:
    """One paragraph: what the plan does, or what is missing; led by the launch when it has several processes."""
    launch = describe_launch(plan)
    text = _explain_memory(plan, shape, plan.fits if memory_fits is None else memory_fits)
    if refused:
        text = f"refused: {'; '.join(refused)} (the memory alone: {text})"
    return f"{launch}: {text}" if launch else text


def _explain_memory(plan: MemoryPlan, shape: ModelShape, fits: bool) -> str:
    run = f"{plan.micro_batch_size} x {plan.max_seq_length} tokens"
    if fits:
        parts = [f"fits: {gib(plan.predicted_peak_gpu_bytes)} of {gib(plan.gpu_bytes)} at {run}"]
        if plan.streamed_layers:
            parts.append(f"{plan.streamed_layers} of {shape.num_layers} decoder layers stream from host RAM")
        if plan.offload_activations:
            parts.append("checkpointed activations go to host RAM")
        if plan.layer_major_micro_batches > 1:
            parts.append(f"the {plan.layer_major_micro_batches} micro-batches of a step go through each layer together, "
                         "their layer inputs in host RAM")
        parts.append(f"loss in chunks of {plan.loss_chunk_size} tokens" if plan.loss_chunk_size else "plain loss")
        return "; ".join(parts)
    gpu_short = plan.predicted_peak_gpu_bytes - plan.gpu_bytes
    host_short = plan.host_ram_bytes - plan.host_ram_available
    missing = []
    if gpu_short > 0:
        missing.append(f"{gib(plan.predicted_peak_gpu_bytes)} of GPU memory ({gib(gpu_short)} more than the "
                       f"{gib(plan.gpu_bytes)} planned for)")
    if host_short > 0:
        missing.append(f"{gib(plan.host_ram_bytes)} of host RAM ({gib(host_short)} more than the "
                       f"{gib(plan.host_ram_available)} here)")
    if plan.load_peak_gpu_bytes > plan.gpu_bytes:
        missing.append(f"{gib(plan.load_peak_gpu_bytes)} of GPU memory to load")
    how = []
    if plan.streamed_layers == shape.num_layers:
        how.append("every decoder layer streamed")
    if plan.offload_activations:
        how.append("activations offloaded")
    text = f"{run} does not fit{' even with ' + ' and '.join(how) if how else ''}: it needs " + " and ".join(missing)
    if plan.max_micro_batch_size:
        text += f"; --per_device_train_batch_size {plan.max_micro_batch_size} fits at this length"
    elif plan.max_seq_length_at_batch_1:
        text += f"; --per_device_train_batch_size 1 --max_seq_length {plan.max_seq_length_at_batch_1} fits"
    else:
        text += "; no micro-batch fits on this card"
    if plan.num_processes > 1 and not plan.fsdp:
        text += ("; layer streaming runs on one process only: shard the model across the GPUs with FSDP2 "
                 "(accelerate launch --config_file recipes/accelerate/fsdp2.yaml ... --optim adamw_torch)")
    elif plan.fsdp and not plan.fsdp_offload_params:
        text += "; with fsdp_offload_params the shards wait in host RAM (recipes/accelerate/fsdp2-offload.yaml)"
    return text


def format_table(plan: MemoryPlan, title: str = "") -> str:
    """The budget table and the plan as readable text."""
    lines = [title] if title else []
    if describe_launch(plan):
        lines.append(f"{describe_launch(plan)}; host RAM is the machine's, for all {plan.num_processes} processes")
    width = max(len(r.name) for r in plan.rows) + 2
    larger = _phase_peak(plan.rows)
    lines.append(f"{'':{width}}{'GiB':>9}  where")
    for row in plan.rows:
        if row.bytes == 0:
            continue
        where = row.where
        if where in PHASES:
            where += "" if row.bytes == larger else " (not at the peak)"
        lines.append(f"{row.name:{width}}{row.bytes / GiB:9.3f}  {where:28}  {row.how}")
    lines.append(f"{'GPU peak':{width}}{plan.predicted_peak_gpu_bytes / GiB:9.3f}  of {gib(plan.gpu_bytes)} "
                 f"(torch reserved: {gib(plan.predicted_allocator_bytes)}; loading: {gib(plan.load_peak_gpu_bytes)})")
    lines.append(f"{'host RAM':{width}}{plan.host_ram_bytes / GiB:9.3f}  of {gib(plan.host_ram_available)}")
    lines.append(f"plan: {plan.resident_layers} resident + {plan.streamed_layers} streamed layers"
                 f"{f' ({plan.layers_in_flight} in flight)' if plan.streamed_layers else ''}, offload_activations="
                 f"{str(plan.offload_activations).lower()}, loss_chunk_size={plan.loss_chunk_size}; largest micro-batch at "
                 f"{plan.max_seq_length} tokens: {plan.max_micro_batch_size}; longest sequence at batch 1: "
                 f"{plan.max_seq_length_at_batch_1}")
    lines.append(plan.explanation)
    return "\n".join(lines)
