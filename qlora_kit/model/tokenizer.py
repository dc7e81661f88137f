"""The model's tokenizer as every stage uses it (right padding, a pad token), in a module light to import.

The data preview loads it without the model code (bitsandbytes, peft) that model/load.py imports.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from qlora_kit.errors import UserError
from qlora_kit.log import notice_once

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The model's tokenizer, padding on the right; eos stands in for a missing pad token.

    Raises:
        UserError: the folder holds no tokenizer that transformers can load.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"{model_dir} holds no tokenizer files: copy those of its model (tokenizer.json, "
                            f"tokenizer_config.json) into it") from None
        reason = " ".join(str(error).split())
        raise UserError(f"the tokenizer in {model_dir} does not load: {reason[:300]}") from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notice_once(f"the tokenizer has no pad token: padding with eos ({tokenizer.eos_token!r})")
    return tokenizer
