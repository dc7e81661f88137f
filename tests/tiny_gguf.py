"""Tiny GGUF files written with the `gguf` package: a tiny BPE tokenizer (and its ChatML template), tiny
random Llama weights, and variants that transformers' GGUF loader refuses."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from tiny_models import tiny_chat_tokenizer

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, chat_template: bool) -> int:
    """A byte-level BPE tokenizer (transformers' fast tokenizer) as GGUF's gpt2 tokenizer fields; its size."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["content"]: t["id"] for t in state["added_tokens"]}
    tokens = [token for token, _ in vocab] + [t for t in special if t not in state["model"]["vocab"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return len(tokens)


def _weights(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Llama tensors in GGUF names, numpy shapes (rows = output features)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (INTERMEDIATE, HIDDEN), f"blk.{i}.ffn_up.weight": (INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, INTERMEDIATE)})
    return {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32)
            for name, shape in shapes.items()}


def write_tiny_gguf(path: Path, architecture: str = "llama", chat_template: bool = True,
                    quant_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32, seed: int = 0) -> Path:
    """A tiny Llama-shaped GGUF with tiny_chat_tokenizer(); `quant_type` Q8_1: blocks gguf cannot dequantize."""
    writer = gguf.GGUFWriter(str(path), architecture)
    vocab = _add_tokenizer(writer, tiny_chat_tokenizer(), chat_template)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    for name, array in _weights(vocab, seed).items():
        if quant_type == gguf.GGMLQuantizationType.F32 or array.ndim == 1:
            writer.add_tensor(name, array)
        else:
            block, size = gguf.GGML_QUANT_SIZES[quant_type]
            raw = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=quant_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
