"""The merged model against the adapter model it came from, next to the noise floor of the dtype.

A fixed set of chat turns runs teacher-forced through the NF4 base through the 4-bit kernel, the
same base with the adapter (the model as trained), that adapter model with its base dequantized and
everything run dense in the export dtype (the adapter still unmerged), the base alone run that way,
and the merged model; one model is in memory at a time. The report gives top-1 agreement and mean /
max |logit difference| of merged vs adapter, and the same figures for the dense adapter model vs the
adapter model: the noise floor of running those very weights in the export dtype, which a merge into
the NF4 base should sit at, while a merge into the original weights drifts past it. The floor is
taken on the trained model, not the base alone: a fine-tuned model has more near-ties between its top
two tokens, so the same rounding flips more of them (docs/benchmarks.md, Export verify, has the
demo's figures). The base-alone figures are reported too.

The floor is only as good as the two models it compares, so it is checked first: the adapter model
through the 4-bit kernel, and its dense copy in the export dtype, must each agree with the same
dequantized weights run dense in float32 as a dtype's rounding does (top-1 agreement at least
`FLOOR_CHECK_TOP1`, mean |logit diff| at most `FLOOR_CHECK_MEAN_RATIO` of the float32 logits' mean
|value|). Rounding to bf16 stays well inside those limits and the fp32-compute kernel matches
float32 exactly, while a kernel computing something else (such as bitsandbytes' repacked CPU layout
read the wrong way) fails by far; docs/benchmarks.md (Export verify) has the figures behind the limits.
A floor that fails is reported as invalid: no verdict, and the command exits with code 1. The float32
copy costs 4 bytes per parameter of host or GPU memory while it runs.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_kit.config import ModelArguments
from qlora_kit.errors import CheckFailed, UserError
from qlora_kit.export.settings import TrainingSetup
from qlora_kit.log import logger
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.model.family import attention_for

REPORT_NAME = "merge_report.json"
# Within the floor: no more than this many times the floor's mean |diff| (plus a little slack for fp32, where
# both are ~0), and top-1 agreement no more than this far below the floor's.
FLOOR_MEAN_RATIO, FLOOR_MEAN_SLACK, FLOOR_TOP1_SLACK = 1.5, 1e-3, 0.03
# A sane floor: both of its models against the same weights run dense in float32.
FLOOR_CHECK_TOP1, FLOOR_CHECK_MEAN_RATIO = 0.80, 0.05

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris, a city on the Seine."}],
    [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
     {"role": "user", "content": "Give me three tips for sleeping better."},
     {"role": "assistant", "content": "Keep a regular schedule, avoid screens before bed, and keep the room cool."}],
    [{"role": "user", "content": "Write a Python function that returns the square of a number."},
     {"role": "assistant", "content": "def square(x):\n    return x * x"}],
    [{"role": "user", "content": "Do you like music?"},
     {"role": "assistant", "content": "I do. Which kind of music do you enjoy most?"},
     {"role": "user", "content": "Mostly jazz, and some classical pieces."},
     {"role": "assistant", "content": "Jazz and classical share a lot: improvisation grew out of both traditions."}],
]


@dataclass
class LogitAgreement:
    """How closely two models' next-token logits agree over the same positions."""

    top1_agreement: float
    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    positions: int


def agreement(a: torch.Tensor, b: torch.Tensor) -> LogitAgreement:
    """Compare two models' logits [positions, V]."""
    diff = (a - b).abs()
    return LogitAgreement(
        top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        mean_abs_logit_diff=diff.mean().item(),
        max_abs_logit_diff=diff.max().item(),
        positions=a.shape[0],
    )


def agrees_as_rounding_does(model: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `model`'s logits agree with the float32 `reference`'s as one dtype's rounding of them would."""
    found = agreement(model, reference)
    scale = reference.abs().mean().item()
    return found.top1_agreement >= FLOOR_CHECK_TOP1 and found.mean_abs_logit_diff <= FLOOR_CHECK_MEAN_RATIO * scale


def within_floor(merged: LogitAgreement, floor: LogitAgreement) -> bool:
    return (merged.mean_abs_logit_diff <= FLOOR_MEAN_RATIO * floor.mean_abs_logit_diff + FLOOR_MEAN_SLACK
            and merged.top1_agreement >= floor.top1_agreement - FLOOR_TOP1_SLACK)


@dataclass
class ChatBatch:
    """The fixed chats as one right-padded batch: padding on the right leaves every real position's logits
    as they are without it, and one forward pass costs far less than one per chat (the 4-bit CPU kernel
    dequantizes every layer on every call)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def chat_batch(tokenizer) -> ChatBatch:
    """The fixed chats rendered with the model's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the tokenizer has no chat template; --verify runs chat turns through it")
    rows = [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] for chat in CHATS]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ChatBatch(ids, mask)


@torch.no_grad()
def chat_logits(model, batch: ChatBatch, device: torch.device) -> torch.Tensor:
    """fp32 logits [positions, V] of every real (unpadded) position, on the CPU."""
    model.eval()
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    return logits.float().cpu()[batch.attention_mask.bool()]


def _free(*models) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verify_merge(adapter_dir: Path, merged_dir: Path, settings: TrainingSetup, merge_base: str, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """Run the comparison, print it, and save it as merged_dir/merge_report.json."""
    if not any(merged_dir.glob("tokenizer*")):
        raise UserError(f"{merged_dir} has no tokenizer; --verify needs one to render chat turns")
    inputs = chat_batch(load_tokenizer(merged_dir, settings.trust_remote_code))
    model_args = ModelArguments(model_name_or_path=str(settings.base_dir), trust_remote_code=settings.trust_remote_code,
                                bnb_4bit_use_double_quant=settings.double_quant,
                                attn_implementation=settings.attn_implementation)
    base = load_quantized_model(settings.base_dir, model_args, settings.compute_dtype, device)
    kernel = chat_logits(base, inputs, device)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    trained = chat_logits(adapted, inputs, device)
    adapted.base_model.model.dequantize()  # the same NF4 weights as dense layers; the adapter stays unmerged
    reference = chat_logits(adapted.to(torch.float32), inputs, device)
    adapted = adapted.to(dtype)
    dense = chat_logits(adapted, inputs, device)
    with adapted.disable_adapter():
        dense_base = chat_logits(adapted, inputs, device)
    _free(base, adapted)
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, device_map={"": device},
                                                        trust_remote_code=settings.trust_remote_code,
                                                        attn_implementation=attention_for(merged_dir, settings.attn_implementation))
    merged = chat_logits(merged_model, inputs, device)
    _free(merged_model)
    vs_adapter, floor = agreement(merged, trained), agreement(dense, trained)
    floor_valid = agrees_as_rounding_does(trained, reference) and agrees_as_rounding_does(dense, reference)
    report = {
        "merge_base": merge_base,
        "dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
        "device": device.type,
        "chats": len(CHATS),
        "merged_vs_adapter": asdict(vs_adapter),
        "noise_floor": asdict(floor),
        "base_noise_floor": asdict(agreement(dense_base, kernel)),
        "floor_check": {"adapter_vs_float32": asdict(agreement(trained, reference)),
                        "dense_vs_float32": asdict(agreement(dense, reference)),
                        "float32_mean_abs_logit": reference.abs().mean().item()},
        "floor_valid": floor_valid,
        "within_noise_floor": floor_valid and within_floor(vs_adapter, floor),
        "criterion": (f"merged vs adapter mean |diff| <= {FLOOR_MEAN_RATIO} x floor + {FLOOR_MEAN_SLACK} and top-1 "
                      f"agreement >= floor - {FLOOR_TOP1_SLACK}; floor: the adapter model (NF4 base through the 4-bit "
                      f"kernel) vs the same model dequantized and run dense in the export dtype; the floor is valid "
                      f"when both of its models agree with the dequantized model run in float32: top-1 >= "
                      f"{FLOOR_CHECK_TOP1}, mean |diff| <= {FLOOR_CHECK_MEAN_RATIO} x the float32 logits' mean |value|"),
    }
    (merged_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(report_line(report))
    fail_unless_verified(report, merged_dir / REPORT_NAME)
    return report


def fail_unless_verified(report: dict, path: Path) -> None:
    """Raise `CheckFailed` when the floor is invalid, or an NF4-base merge is outside it."""
    if not report["floor_valid"]:
        raise CheckFailed(f"--verify could not measure a noise floor: the 4-bit adapter model does not compute what "
                          f"its own dequantized weights compute in float32, so no merge can be judged (see "
                          f"floor_check in {path})")
    if report["merge_base"] == "nf4" and not report["within_noise_floor"]:
        raise CheckFailed(f"the merged model is outside the noise floor of the adapter model it came from (see {path})")


def report_line(report: dict) -> str:
    """The report in one human line."""
    merged, floor = report["merged_vs_adapter"], report["noise_floor"]
    if not report["floor_valid"]:
        check = report["floor_check"]["adapter_vs_float32"]
        return (f"verify ({report['merge_base']} base, {report['dtype']}): FLOOR INVALID: the 4-bit adapter model vs "
                f"its dequantized weights in float32 gives top-1 {check['top1_agreement']:.1%}, mean |diff| "
                f"{check['mean_abs_logit_diff']:.3f}; no verdict on the merge")
    verdict = "within" if report["within_noise_floor"] else "OUTSIDE"
    return (f"verify ({report['merge_base']} base, {report['dtype']}): merged vs adapter top-1 "
            f"{merged['top1_agreement']:.1%}, mean |diff| {merged['mean_abs_logit_diff']:.3f}, max "
            f"{merged['max_abs_logit_diff']:.2f}; noise floor top-1 {floor['top1_agreement']:.1%}, mean |diff| "
            f"{floor['mean_abs_logit_diff']:.3f}, max {floor['max_abs_logit_diff']:.2f}: {verdict} the noise floor")
