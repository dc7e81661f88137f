"""Tiny random decoder models of several architectures, built in code, for unit tests; and broken model folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from qlora_kit.bench.random_model import random_model, save_random_model

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 512

# Architecture -> (config class, config overrides)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "gpt2": ("GPT2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 2, "num_experts_per_tok": 1}),
}

# The architectures above of each family qlora_kit supports (qlora_kit/model/family.py), with what makes
# their differences count: Gemma's softcap close to the logits' size, Mistral's embeddings tied.
FAMILY_ARCHITECTURES = {
    "llama": {}, "mistral": {"tie_word_embeddings": True}, "qwen2": {}, "qwen3": {},
    "gemma2": {"final_logit_softcapping": 5.0}, "gemma3": {"final_logit_softcapping": 5.0}, "phi3": {},
    "granite": {}, "cohere": {},
}

# The projections each architecture must yield, relative to a decoder block.
EXPECTED_PROJECTIONS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "phi3": ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
for name in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "granite", "cohere"):
    EXPECTED_PROJECTIONS[name] = EXPECTED_PROJECTIONS["llama"]


def tiny_config(architecture: str = "llama", **overrides):
    class_name, extra = ARCHITECTURES[architecture]
    config_class = getattr(transformers, class_name)
    if architecture == "gpt2":
        values = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, vocab_size=VOCAB,
                      n_positions=256)
    else:
        values = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      max_position_embeddings=256)
    values.update(extra)
    values.update(overrides)
    return config_class(**values)


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer of fewer than VOCAB tokens, trained on --verify's chats, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qlora_kit.data.tokenize import CHATML_TEMPLATE
    from qlora_kit.export.verify import CHATS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([m["content"] for chat in CHATS for m in chat] + ["system user assistant"], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(architecture: str = "llama", seed: int = 0, **overrides):
    return random_model(tiny_config(architecture, **overrides), seed)


def save_tiny_model(folder: Path, architecture: str = "llama", dtype=torch.bfloat16, seed: int = 0, **overrides) -> Path:
    """Write a tiny random model as an HF folder (safetensors) and return the folder."""
    return save_random_model(folder, tiny_config(architecture, **overrides), dtype, seed)


# Broken model folders: each writes one into `folder` and returns what the one-line error must say.

def no_weights(folder: Path) -> str:
    save_tiny_model(folder)
    (folder / "model.safetensors").unlink()
    return "has config.json but no weights"


def config_not_json(folder: Path) -> str:
    save_tiny_model(folder)
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    return "config.json is not valid JSON (line 2"


def truncated_weights(folder: Path) -> str:
    save_tiny_model(folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    return f"model.safetensors is truncated ({size - 1000:,} bytes, its header says {size:,})"


def missing_shard(folder: Path) -> str:
    save_random_model(folder, tiny_config(), max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    return f"lacks {shards[-1].name}, named by model.safetensors.index.json (1 of {len(shards)} weight files missing)"


BROKEN_MODELS = [no_weights, config_not_json, truncated_weights, missing_shard]
