"""A GGUF file against the merged HF model it was exported beside: same chats, same tokens.

Two readers of the file. transformers' GGUF loader (always there) reads it back, and runs the
fixed chats of --verify (verify.py) next to the merged model: top-1 agreement and mean |logit
diff|, judged against the floor of the file's type: the merged model with its matrices rounded as
the file stores them (f16, bf16, or q8_0 quantized and dequantized with the gguf package) against
the merged model itself. A wrong tensor name, permutation or hyper-parameter lands far outside it.
The tokenizer read back from the file must give the same ids as the run's on strings with Unicode,
code and special tokens. llama.cpp itself (the optional `llama-cpp-python`, built from source by
`pip install -e ".[llamacpp]"`) is the second reader, when installed: its next-token choices on the
same chats, and a greedy reply through the chat template stored in the file.

The merged folder must be float32 (`--dtype float32`), so that the figures measure the file's
rounding and not the merged folder's own.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit.errors import CheckFailed, UserError, exit_on_user_error
from qlora_kit.export.gguf import GGUF_TYPES
from qlora_kit.export.verify import CHATS, agreement, chat_batch, chat_logits, within_floor
from qlora_kit.log import logger, setup_logging

ROUND_TRIP_STRINGS = [
    "Héllo wörld: ça va? Ünïcödé, 你好，世界, Привет, مرحبا, 🙂👍🏽",
    "def square(x: int) -> int:\n\treturn x ** 2  # {\"a\": [1, 2]}\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "   leading spaces, trailing   \n\n\nnew lines, tabs\t\tand 1234567890 digits",
]
CPU = torch.device("cpu")


def round_like(weight: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    """A float32 matrix as the GGUF type stores it, back in float32."""
    if qtype == gguf.GGMLQuantizationType.F16:
        return weight.half().float()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return weight.bfloat16().float()
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        data = gguf.quants.quantize(weight.numpy(), qtype)
        return torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(weight.shape)
    return weight


def matrix_type(gguf_file: Path) -> gguf.GGMLQuantizationType:
    """The type most of the file's matrices are stored in."""
    types = [tensor.tensor_type for tensor in gguf.GGUFReader(gguf_file).tensors if len(tensor.shape) == 2]
    return max(set(types), key=types.count)


def _load_reference(merged_dir: Path) -> torch.nn.Module:
    config = json.loads((merged_dir / "config.json").read_text()) if (merged_dir / "config.json").is_file() else {}
    stored = config.get("dtype", config.get("torch_dtype"))
    if stored != "float32":
        raise UserError(f"{merged_dir} is not a float32 merged model ({stored}); compare the GGUF with a merged "
                        f"folder exported with --dtype float32")
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()


def tokenizer_round_trip(gguf_file: Path, merged_dir: Path) -> dict:
    """Ids and decoded text of the file's tokenizer vs the merged folder's, string by string."""
    ours = AutoTokenizer.from_pretrained(merged_dir)
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    same = [ours(text)["input_ids"] == theirs(text)["input_ids"] and ours.decode(ours(text)["input_ids"]) ==
            theirs.decode(theirs(text)["input_ids"]) for text in ROUND_TRIP_STRINGS]
    return {"strings": len(same), "identical": sum(same)}


@torch.no_grad()
def compare_with_merged(gguf_file: Path, merged_dir: Path, gguf_type: Optional[str] = None,
                        check_tokenizer: bool = True) -> dict:
    """The file read back by transformers vs the float32 merged model, and the floor of the file's type.

    Args:
        gguf_file: the exported file.
        merged_dir: the float32 merged model of the same run.
        gguf_type: f16, bf16 or q8_0 when known (else read from the file, which costs a parse of it).
        check_tokenizer: also compare the tokenizers (another parse of the file).

    Returns:
        A report: gguf_vs_merged and floor (LogitAgreement as dicts), within_floor, tokenizer.
    """
    batch = chat_batch(AutoTokenizer.from_pretrained(merged_dir))
    reference_model = _load_reference(merged_dir)
    reference = chat_logits(reference_model, batch, CPU)
    qtype = GGUF_TYPES[gguf_type][0] if gguf_type else matrix_type(gguf_file)
    for parameter in reference_model.parameters():
        if parameter.ndim == 2:
            parameter.copy_(round_like(parameter, qtype))
    rounded = chat_logits(reference_model, batch, CPU)
    del reference_model
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    found = chat_logits(read_back, batch, CPU)
    del read_back
    gc.collect()
    vs_merged, floor = agreement(found, reference), agreement(rounded, reference)
    report = {"gguf_type": qtype.name.lower(), "chats": len(CHATS), "gguf_vs_merged": asdict(vs_merged),
              "floor": asdict(floor), "within_floor": within_floor(vs_merged, floor),
              "tokenizer": tokenizer_round_trip(gguf_file, merged_dir) if check_tokenizer else None}
    tokenizer = report["tokenizer"] or {"identical": "not compared", "strings": len(ROUND_TRIP_STRINGS)}
    logger.info(f"{gguf_file.name} read back by transformers vs the merged model: top-1 {vs_merged.top1_agreement:.1%}, "
                f"mean |diff| {vs_merged.mean_abs_logit_diff:.4f}; {report['gguf_type']} floor top-1 "
                f"{floor.top1_agreement:.1%}, mean |diff| {floor.mean_abs_logit_diff:.4f}: "
                f"{'within' if report['within_floor'] else 'OUTSIDE'} the floor; tokenizer identical on "
                f"{tokenizer['identical']}/{tokenizer['strings']} strings")
    return report


def llama_cpp_check(gguf_file: Path, merged_dir: Path, max_tokens: int = 24) -> Optional[dict]:
    """The file in llama.cpp: next-token choices on the chats vs the merged model, and a greedy reply.

    Returns:
        None when llama-cpp-python is not installed; else a report.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        logger.info("llama-cpp-python is not installed (pip install -e \".[llamacpp]\"): llama.cpp check skipped")
        return None
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = chat_batch(tokenizer)
    reference = chat_logits(_load_reference(merged_dir), batch, CPU)
    llm = Llama(model_path=str(gguf_file), n_ctx=512, logits_all=True, verbose=False, seed=0)
    choices, tokenized_alike = [], 0
    for row, mask in zip(batch.input_ids, batch.attention_mask):
        ids = row[mask.bool()].tolist()
        text = tokenizer.decode(ids)
        tokenized_alike += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        choices.append(torch.from_numpy(llm.scores[:len(ids)].copy()).argmax(-1))
    top1 = (torch.cat(choices) == reference.argmax(-1)).float().mean().item()
    reply = llm.create_chat_completion(messages=[CHATS[0][0]], max_tokens=max_tokens, temperature=0.0)
    report = {"top1_agreement": top1, "positions": reference.shape[0], "chats_tokenized_alike": tokenized_alike,
              "chats": len(CHATS), "greedy_reply": reply["choices"][0]["message"]["content"]}
    logger.info(f"{gguf_file.name} in llama.cpp vs the merged model: top-1 {top1:.1%} over {report['positions']} "
                f"positions, {tokenized_alike}/{len(CHATS)} chats tokenized alike; greedy reply to "
                f"{CHATS[0][0]['content']!r}: {report['greedy_reply']!r}")
    return report


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> dict:
    """`python tools/check_gguf.py GGUF_FILE MERGED_DIR`: both checks; exit 1 when one fails."""
    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise UserError("usage: python tools/check_gguf.py GGUF_FILE MERGED_DIR (a float32 merged folder)")
    gguf_file, merged_dir = Path(args[0]), Path(args[1])
    for path, what in ((gguf_file, "GGUF file"), (merged_dir / "config.json", "merged model folder")):
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the {what}")
    report = {"transformers": compare_with_merged(gguf_file, merged_dir),
              "llama_cpp": llama_cpp_check(gguf_file, merged_dir)}
    transformers_report = report["transformers"]
    if not transformers_report["within_floor"] or transformers_report["tokenizer"]["identical"] < len(ROUND_TRIP_STRINGS):
        raise CheckFailed(f"{gguf_file} does not compute or tokenize as {merged_dir} does")
    return report
