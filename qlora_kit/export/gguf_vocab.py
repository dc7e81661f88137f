"""The tokenizer of a GGUF file: vocabulary, token types, merges, special tokens, chat template.

Two tokenizer kinds are written, the two llama.cpp reads for the families the GGUF export supports:
byte-level BPE (`tokenizer.ggml.model` "gpt2": SmolLM, Llama 3, Qwen2, Mistral's tekken) with the
tokens, types and merges taken from the run's `tokenizer.json` through transformers, and the
SentencePiece-style BPE with byte fallback (`"llama"`: Llama 2, Mistral v0.1-v0.3) through gguf's
own `LlamaHfVocab`. Merges, special token ids, add-bos/eos flags and the chat template come from
gguf's `SpecialVocab`, which reads the same files llama.cpp's converter reads.

llama.cpp also needs the name of the pre-tokenizer (the regex that splits text before BPE) for a
byte-level vocabulary. It is chosen here from the model family and the vocabulary's size, for the
tokenizers known to qlora_kit; another byte-level tokenizer gets llama.cpp's "default" and one log
line saying that llama.cpp may then split text differently from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from qlora_kit.errors import UserError
from qlora_kit.log import notice_once

# (family, tokens in the tokenizer, special tokens included) -> llama.cpp's pre-tokenizer name.
PRE_TOKENIZERS = {
    ("llama", 49152): "smollm",  # SmolLM / SmolLM2
    ("llama", 128256): "llama-bpe",  # Llama 3.x
    ("qwen2", 151646): "qwen2",  # Qwen2
    ("qwen2", 151665): "qwen2",  # Qwen2.5
    ("mistral", 131072): "tekken",  # Mistral Nemo and later
}


def tokenizer_kind(folder: Path) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (BPE with byte fallback), from tokenizer.json.

    Raises:
        UserError: no tokenizer.json, or a tokenizer of another kind.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; the GGUF export writes the tokenizer from it")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer; the GGUF export writes BPE tokenizers only")
    if model.get("byte_fallback"):
        return "llama"
    if "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise UserError(f"{path}: a BPE tokenizer that is neither byte-level nor byte-fallback; "
                        f"the GGUF export does not write it")
    return "gpt2"


def pre_tokenizer_name(family: str, vocab_size: int) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level vocabulary (see the module docstring)."""
    name = PRE_TOKENIZERS.get((family, vocab_size))
    if name is None:
        notice_once(f"no known llama.cpp pre-tokenizer for a {family} tokenizer of {vocab_size} tokens: writing "
                    f"'default'; llama.cpp may split text differently from transformers (check with "
                    f"tools/check_gguf.py)")
        return "default"
    return name


def _byte_level_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their types as llama.cpp's converter lists them (ids without a token become [PADn])."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _byte_fallback_tokens(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for index in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's last id
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, family: str, vocab_size: int) -> None:
    """Write the tokenizer in `folder` (tokenizer.json and its config) into the GGUF metadata.

    Args:
        writer: the GGUF writer, before its header is written.
        folder: the run's tokenizer folder.
        family: the model family (config.json's model_type).
        vocab_size: rows of the embedding matrix; the token list has exactly that many entries.
    """
    kind = tokenizer_kind(folder)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens, types = _byte_level_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_pre(pre_tokenizer_name(family, len(tokenizer)))
    else:
        tokens, scores, types = _byte_fallback_tokens(folder, vocab_size)
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
