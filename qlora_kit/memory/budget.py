"""Bytes of the tensors a QLoRA run holds, exactly as the libraries store them.

NF4 weights (bitsandbytes 0.4x-0.5x `Linear4bit`, quant_type nf4, blocksize 64), per layer of n weights:
  packed weight   ceil(n/2) uint8            two 4-bit codes per byte
  absmax          ceil(n/64) uint8           with double quantization (else fp32, 4 bytes each)
  offset          1 fp32                     mean of the absmax, subtracted before quantizing it
  code            16 fp32                    the NF4 code book, one copy per layer
  state2.absmax   ceil(ceil(n/64)/256) fp32  second-level scales, one per 256 first-level blocks
  state2.code     256 fp32                   the 8-bit dynamic code book, one copy per layer
so 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (the QLoRA paper's 0.127 bits of scales) plus
1,092 bytes per layer. Biases, embeddings, lm_head and norms stay in the compute dtype.

LoRA (peft): A is r x in, B is out x r per adapted layer (DoRA adds a magnitude of `out`), in the
LoRA dtype; their gradients have the same shapes and dtype.

Optimizer states (per trainable tensor of n elements, after the first step):
  adamw_torch             exp_avg + exp_avg_sq in the parameter's dtype, plus a fp32 step scalar
  (paged_)adamw_32bit     state1 + state2 in fp32 (bitsandbytes)
  (paged_)adamw_8bit      state1 + state2 in uint8 with fp32 absmax1/absmax2 per 256-element block,
                          and the two 256-entry fp32 code books once per optimizer; a tensor under
                          `min_8bit_size` (4096) elements keeps 32-bit state instead, as bitsandbytes does.
Paged states of >= 1e5 elements live in CUDA unified memory, outside PyTorch's allocator (they still
occupy the card until evicted), so `torch.cuda.max_memory_reserved()` does not see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from qlora_kit.memory.shapes import LinearShape, ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
NF4_CODE_BYTES = 16 * 4
DYNAMIC_CODE_BYTES = 256 * 4
OPTIMIZER_BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
PAGED_MIN_NUMEL = 100_000


def nf4_packed_bytes(numel: int) -> int:
    """Bytes of the packed 4-bit codes of one NF4 weight: the parameter itself (what FSDP shards)."""
    return (numel + 1) // 2


def nf4_state_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of the quantization state of one NF4 weight (absmax, offset, nested absmax, code books): it lives
    on the module, not in a parameter, so FSDP leaves it whole on every process."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if not double_quant:
        return 4 * blocks + NF4_CODE_BYTES
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return blocks + 4 + NF4_CODE_BYTES + 4 * nested_blocks + DYNAMIC_CODE_BYTES


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight of `numel` elements with its quantization state."""
    return nf4_packed_bytes(numel) + nf4_state_bytes(numel, double_quant)


def linear_bytes(linear: LinearShape, compute_bytes: int, double_quant: bool = True) -> int:
    """One quantized Linear: its NF4 weight and state, and its bias in the compute dtype."""
    return nf4_bytes(linear.numel, double_quant) + (linear.out_features * compute_bytes if linear.bias else 0)


@dataclass
class WeightBytes:
    """The frozen base, split the way the planner places it."""

    per_layer: list[int]        # each decoder block: NF4 projections, their biases, its norms
    embeddings: int             # input embeddings (and lm_head when tied)
    lm_head: int                # 0 when tied to the input embeddings
    other: int                  # final norm and anything else outside the blocks
    quantized_params: int       # weights held in NF4
    per_layer_states: list[int] = field(default_factory=list)  # of per_layer: the NF4 quantization states
    other_states: int = 0       # of other: the quantization states of NF4 weights outside the blocks

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.embeddings + self.lm_head + self.other

    @property
    def per_layer_params(self) -> list[int]:
        """Each decoder block's parameters (packed NF4 codes, biases, norms): what FSDP shards."""
        return [total - states for total, states in zip(self.per_layer, self.per_layer_states)]


def weight_bytes(shape: ModelShape, compute_bytes: int, double_quant: bool = True) -> WeightBytes:
    """Bytes of every tensor of the frozen NF4 base, by where it sits."""
    per_layer = [0] * shape.num_layers
    per_layer_states = [0] * shape.num_layers
    other = other_states = 0
    for linear in shape.quantized:
        size = linear_bytes(linear, compute_bytes, double_quant)
        states = nf4_state_bytes(linear.numel, double_quant)
        if linear.layer is None:
            other += size
            other_states += states
        else:
            per_layer[linear.layer] += size
            per_layer_states[linear.layer] += states
    embeddings = lm_head = 0
    for param in shape.unquantized:
        size = param.numel * compute_bytes
        if param.layer is not None:
            per_layer[param.layer] += size
        elif "embed" in param.name or param.name.endswith("wte.weight"):
            embeddings += size
        elif "lm_head" in param.name:
            lm_head += size
        else:
            other += size
    quantized_params = sum(linear.numel for linear in shape.quantized)
    return WeightBytes(per_layer, embeddings, lm_head, other, quantized_params, per_layer_states, other_states)


def adapted_linears(shape: ModelShape, targets: str = "all") -> list[LinearShape]:
    """The Linear modules LoRA sits on: every projection for 'all', else modules named in the list."""
    if targets.strip() == "all":
        wanted = set(shape.projections.names)
        prefix = shape.projections.blocks_path + "."
        return [q for q in shape.quantized if q.layer is not None and q.name[len(prefix):].split(".", 1)[1] in wanted]
    names = [n.strip() for n in targets.split(",") if n.strip()]
    picked = [q for q in shape.quantized if any(q.name == n or q.name.endswith("." + n) for n in names)]
    if "lm_head" in names:  # unquantized, but peft adapts it when named
        picked.append(LinearShape("lm_head", shape.hidden_size, shape.vocab_size, False, None))
    return picked


def lora_tensor_numels(linears: list[LinearShape], r: int, dora: bool = False) -> list[int]:
    """Element counts of every LoRA tensor: A (r x in) and B (out x r) per layer, plus DoRA's magnitude."""
    numels = []
    for linear in linears:
        numels += [r * linear.in_features, linear.out_features * r]
        if dora:
            numels.append(linear.out_features)
    return numels


def optimizer_state_bytes(numels: list[int], optim: str, param_bytes: int) -> int:
    """Bytes of the optimizer states of trainable tensors of these sizes, once the first step has run."""
    if optim == "adamw_torch":
        return sum(2 * n * param_bytes + 4 for n in numels)
    if optim.endswith("_32bit"):
        return sum(2 * n * 4 for n in numels)
    if not optim.endswith("_8bit"):
        raise ValueError(f"unknown optimizer {optim}")
    total, any_8bit = 0, False
    for n in numels:
        if n < MIN_8BIT_SIZE:
            total += 2 * n * 4
        else:
            any_8bit = True
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIMIZER_BLOCKSIZE)
    return total + (2 * DYNAMIC_CODE_BYTES if any_8bit else 0)


def paged_state_bytes(numels: list[int], optim: str, param_bytes: int) -> int:
    """The part of the optimizer states a paged optimizer keeps in CUDA unified memory."""
    if not optim.startswith("paged"):
        return 0
    return optimizer_state_bytes([n for n in numels if n >= PAGED_MIN_NUMEL], optim, param_bytes) - \
        (2 * DYNAMIC_CODE_BYTES if optim.endswith("_8bit") and any(n >= PAGED_MIN_NUMEL for n in numels) else 0)


@dataclass
class PlanSettings:
    """The settings a memory plan is computed from: the run's memory-relevant fields, and the planner's knobs.

    The fields carry the recipe's names.

    `offload_activations`, `loss_chunk_size` and `resident_layers` left as None are the planner's to choose;
    `loss_chunk_size` 0 is the plain loss over full logits.
    """

    micro_batch_size: int = 1
    max_seq_length: int = 2048
    lora_r: int = 16
    lora_target_modules: str = "all"
    lora_dropout: float = 0.05
    use_dora: bool = False
    optim: str = "paged_adamw_8bit"
    compute_dtype: str = "bfloat16"
    lora_dtype: str = "bfloat16"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    padded_batches: bool = True
    offload_activations: Optional[bool] = None
    loss_chunk_size: Optional[int] = None
    resident_layers: Optional[int] = None  # decoder layers on the GPU; None: the planner's choice
    layer_major_micro_batches: int = 1  # micro-batches a step runs layer-major when layers stream; 1: plain order
    trained_fraction: float = 1.0  # share of positions with a label; the chunked loss skips the rest
    num_processes: int = 1  # processes (GPUs) of the run; the plan is per GPU
    fsdp: bool = False  # FSDP2 shards the base, LoRA, gradients and optimizer states across the processes
    fsdp_offload_params: bool = False  # FSDP keeps the shards (and their gradients and optimizer states) in host RAM

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.max_seq_length

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def lora_bytes(self) -> int:
        return DTYPE_BYTES[self.lora_dtype]
