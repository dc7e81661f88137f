"""Bytes of the activations of one training step: what autograd keeps, and what backward adds.

N = micro_batch_size x max_seq_length tokens, d = compute dtype bytes, H hidden, q = heads x head_dim,
kv = kv_heads x head_dim, I the MLP width, V the vocabulary. The counts follow what PyTorch's autograd
saves for a transformers decoder block (measured with saved-tensor hooks, see tests/test_plan_bytes.py):
a product with a frozen operand saves only that operand, so the norms' weights and the rotary cos/sin
cost no activation memory, while every RMSNorm keeps an fp32 copy of its input.

Per token, one decoder block keeps for its backward:
  norms         4H per norm (its fp32 input copy; none for the first norm in fp32, whose input is the
                checkpoint itself) + 4 (rsqrt); q/k norms (Qwen3, Gemma-3) 4q + 4kv
  projections   the NF4 matmul keeps nothing; LoRA's A keeps its input: d x H for the attention input
                and again for the MLP input, d x I for the MLP product; with lora_dropout > 0 instead
                (d + 1) x in per adapted projection (its dropout output and bool mask)
  attention     d x (q + 2 kv') for q, k, v after rotary (kv' = q when a padding mask makes transformers
                repeat the kv heads), d x q output, 4 x heads log-sum-exp; with a padding mask sdpa keeps
                a float copy of it, B x T x T x d per block; eager attention (Gemma-2 has no sdpa) adds
                heads x T x (4 + d) (fp32 softmax and its d copy; + d with Gemma-2 attention softcapping);
                a fused qkv projection (Phi-3) keeps its whole output alive through v, d x (q + kv) more
  MLP           d x (gate + up outputs + act) = 3 I d gated (the product only through LoRA), I d plain
  LoRA          d x r per adapted layer (A's output)
Backward of a block adds its incoming gradient (d H per token) and, at the MLP, two MLP-width
gradients (2 d I per token) or one beside the dequantized down-projection weight (d x in x out, which
bitsandbytes builds to multiply the gradient by), whichever is larger.

The loss: the plain loss holds d N V of logits, their fp32 copy and its log-softmax (forward, 8 + d
bytes per logit), then the log-softmax, its gradient and the NLL gradient (backward): 12 N V bytes at
its peak (+ d N V for Gemma's softcapping, whose tanh output is kept). The chunked loss holds the same for one chunk of c trained tokens: 12 c V (+ d c V), plus
the trained positions' hidden states it gathers. The planner counts every position as trained
(`trained_fraction` 1), the worst case; an assistant-only chat run trains fewer.
"""

from __future__ import annotations

from qlora_kit.memory.budget import PlanSettings, adapted_linears
from qlora_kit.memory.shapes import ModelShape


def checkpoint_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """One checkpointed hidden state: a decoder layer's input, N x H x d."""
    return settings.tokens * shape.hidden_size * settings.compute_bytes


def _norm_bytes_per_token(shape: ModelShape, settings: PlanSettings) -> int:
    total, head_norms = 0, 0
    for index, dim in enumerate(shape.norm_dims):
        if dim == shape.head_dim and dim != shape.hidden_size:
            width, rows = (shape.q_dim, shape.num_heads) if head_norms == 0 else (shape.kv_dim, shape.num_kv_heads)
            total += 4 * width + 4 * rows
            head_norms += 1
        else:
            first_in_fp32 = index == 0 and settings.compute_bytes == 4
            total += (0 if first_in_fp32 else 4 * dim) + 4
    return total


def attention_kind(shape: ModelShape, settings: PlanSettings) -> str:
    """The attention a run gets: the asked one, or eager for models without sdpa (Gemma-2)."""
    if settings.attn_implementation == "sdpa" and not shape.supports_sdpa:
        return "eager"
    return settings.attn_implementation


def _attention_bytes_per_token(shape: ModelShape, settings: PlanSettings) -> int:
    d, kind = settings.compute_bytes, attention_kind(shape, settings)
    repeated = (settings.padded_batches and kind == "sdpa") or kind == "eager"
    kv = shape.q_dim if repeated else shape.kv_dim
    total = d * (shape.q_dim + 2 * kv) + d * shape.q_dim + 4 * shape.num_heads
    if shape.fused_qkv:  # v is a slice of the fused output, which stays alive whole
        total += d * (shape.q_dim + shape.kv_dim)
    if kind == "eager":
        softcap = 1 if shape.model_type.startswith("gemma2") else 0
        total += shape.num_heads * settings.max_seq_length * (4 + d * (1 + softcap))
    return total


OUTPUT_PROJECTION_WORDS = ("o_proj", "out_proj", "dense", "c_proj", "wo")


def _block_groups(shape: ModelShape) -> list[tuple[list[str], int, bool]]:
    """The projections of a block grouped by the tensor they read: (names, width, read anyway).

    "Read anyway" marks an input that autograd keeps whatever LoRA does: the attention output, which
    sdpa saves. The other inputs (the two norm outputs, the MLP product) are kept only by LoRA.
    """
    attention, mlp = shape.projections.attention, shape.projections.mlp
    out = next((n for n in attention if n.split(".")[-1] in OUTPUT_PROJECTION_WORDS), attention[-1] if attention else None)
    groups = []
    if attention:
        groups.append(([n for n in attention if n != out], shape.hidden_size, False))
        groups.append(([out], shape.q_dim, True))
    if mlp:
        groups.append((mlp[:-1], shape.hidden_size, False))
        groups.append((mlp[-1:], shape.intermediate_size, False))
    return groups


def _projection_inputs_per_token(shape: ModelShape, settings: PlanSettings) -> int:
    """Projection inputs kept for backward, and LoRA's own activations.

    The frozen NF4 matmul keeps nothing of its input; LoRA's A keeps its input (the projection's input,
    or with lora_dropout > 0 the dropout's output and its bool mask, one per adapted projection) and
    B keeps A's output (r values).
    """
    d = settings.compute_bytes
    prefix = shape.projections.blocks_path + ".0."
    adapted = {linear.name[len(prefix):] for linear in adapted_linears(shape, settings.lora_target_modules)
               if linear.layer == 0}
    total = d * settings.lora_r * len(adapted)
    for names, width, read_anyway in _block_groups(shape):
        count = sum(1 for n in names if n in adapted)
        if count and settings.lora_dropout > 0:
            total += count * (d + 1) * width
        elif count and not read_anyway:
            total += d * width
    return total


def layer_saved_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """What autograd keeps of one decoder block's forward, for its backward."""
    mlp = (3 if shape.mlp_gated else 1) * shape.intermediate_size * settings.compute_bytes
    per_token = (_norm_bytes_per_token(shape, settings) + _attention_bytes_per_token(shape, settings) + mlp
                 + _projection_inputs_per_token(shape, settings))
    return settings.tokens * per_token + attention_bias_bytes(shape, settings)


def attention_bias_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The float mask one sdpa call builds from a padding mask and keeps: B x T x T x d."""
    if not settings.padded_batches or attention_kind(shape, settings) != "sdpa":
        return 0
    return settings.micro_batch_size * settings.max_seq_length ** 2 * settings.compute_bytes


def attention_mask_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The boolean 4-D padding mask the decoder builds once and every layer shares: B x T x T."""
    if not settings.padded_batches or attention_kind(shape, settings) == "flash_attention_2":
        return 0
    return settings.micro_batch_size * settings.max_seq_length ** 2


def dequantized_weight_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The largest projection dequantized to the compute dtype, as bitsandbytes does for each matmul."""
    largest = max((linear.numel for linear in shape.quantized), default=0)
    return largest * settings.compute_bytes


def layer_backward_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """Gradients alive while one block runs backward, beyond what it saved.

    Measured on the CPU with `LiveTensorBytes`: the incoming gradient, then at the MLP either two
    MLP-width gradients, or one beside the dequantized down-projection weight, whichever is larger.
    """
    d, N = settings.compute_bytes, settings.tokens
    mlp = max(2 * N * shape.intermediate_size * d, N * shape.intermediate_size * d + dequantized_weight_bytes(shape, settings))
    return N * shape.hidden_size * d + mlp


def final_hidden_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """The final norm's fp32 input copy and its output (the hidden states lm_head reads)."""
    return settings.tokens * shape.hidden_size * (4 + settings.compute_bytes)


def loss_bytes(shape: ModelShape, settings: PlanSettings, chunk_size: int) -> int:
    """Logits and cross-entropy at their peak: every position (chunk_size 0), or one chunk of trained ones."""
    trained = int(settings.tokens * settings.trained_fraction)
    tokens = settings.tokens if chunk_size == 0 else min(chunk_size, trained)
    per_logit = 12 + (settings.compute_bytes if shape.final_logit_softcapping else 0)
    gathered = trained * shape.hidden_size * settings.compute_bytes if chunk_size else 0
    return tokens * shape.vocab_size * per_logit + gathered
