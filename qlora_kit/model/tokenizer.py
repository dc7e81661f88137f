"""The model's tokenizer as every stage uses it (right padding, a pad token), in a module light to import.

The data preview loads it without the model code (bitsandbytes, peft) that model/load.py imports.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from qlora_kit.log import notice_once


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The model's tokenizer, padding on the right; eos stands in for a missing pad token."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notice_once(f"the tokenizer has no pad token: padding with eos ({tokenizer.eos_token!r})")
    return tokenizer
