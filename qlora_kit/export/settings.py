"""What an export needs to know about the run: the base model, and how training quantized it.

A qlora_kit run folder says it all in run_config.yaml (`resolved:` base_model_dir, compute_dtype,
quantization, model_fingerprint). A bare PEFT adapter folder is accepted too: the base comes from
--base_model or from adapter_config.json, and the quantization settings must then be given as flags
(--bnb_4bit_compute_dtype, --bnb_4bit_use_double_quant) whenever the merge re-creates the NF4 weights
or --verify rebuilds the adapter model: a guess would make the merge differ from what training saw.

The base folder is checked against the fingerprint the run recorded (qlora_kit.fingerprint): a base
with other weights is refused unless --allow_other_base is given. What could not be checked (no
record, or an old config-only record) is said once and listed in `TrainingSetup.unchecked`, and the
merge then makes no claim that it computes what the adapter model computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from qlora_kit.errors import UserError
from qlora_kit.export.adapter import ADAPTER_CONFIG
from qlora_kit.fingerprint import compare, model_fingerprint
from qlora_kit.log import notice_once
from qlora_kit.model.load import DTYPES
from qlora_kit.paths import RUN_MARKER
from qlora_kit.sources import resolve_model


@dataclass
class TrainingSetup:
    """What the run trained with: the base model folder and the quantization training used."""

    base_dir: Path
    compute_dtype: torch.dtype
    double_quant: bool
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    trained_on: str = "unknown"  # the run's device, e.g. 'cuda' or 'cpu'
    unchecked: list[str] = field(default_factory=list)  # what the merge cannot vouch for, in words


def _read_run_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / RUN_MARKER
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML; fix it or pass --base_model and the quantization flags") from None
    return values if isinstance(values, dict) else {}


def training_setup(adapter_dir: Path, base_model: Optional[str] = None, compute_dtype: Optional[str] = None,
                   double_quant: Optional[bool] = None, allow_other_base: bool = False,
                   quantization_needed: bool = True) -> TrainingSetup:
    """Resolve the base folder and quantization; explicit arguments win over the run's record.

    Args:
        adapter_dir: the run folder, or a bare PEFT adapter folder.
        base_model: --base_model, if given.
        compute_dtype: --bnb_4bit_compute_dtype, if given.
        double_quant: --bnb_4bit_use_double_quant, if given.
        allow_other_base: merge onto a base whose fingerprint is not the one the run recorded.
        quantization_needed: the NF4 settings matter (merge base nf4, or --verify); without them a
            run with no record of its quantization is refused.

    Raises:
        UserError: the adapter folder or the base model cannot be found, the quantization training used
            is unknown and needed, or the base is not the model the run was trained on.
    """
    if not adapter_dir.is_dir():
        raise UserError(f"--adapter_dir {adapter_dir} does not exist; point it at a run folder")
    run = _read_run_config(adapter_dir)
    resolved = run.get("resolved") or {}
    quantization = resolved.get("quantization") or {}
    base = base_model or resolved.get("base_model_dir") or run.get("model_name_or_path") or _adapter_base(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir} does not say which base model it was trained on; pass --base_model")
    dtype_name = compute_dtype or resolved.get("compute_dtype")
    if double_quant is None:
        recorded = quantization.get("double_quant", run.get("bnb_4bit_use_double_quant"))
        double_quant = None if recorded is None else bool(recorded)
    _require_quantization(adapter_dir, dtype_name, double_quant, quantization_needed)
    dtype_name = dtype_name or "bfloat16"  # unknown and unused: the merge keeps the original weights
    if dtype_name not in DTYPES:
        raise UserError(f"compute dtype {dtype_name} is not one of {', '.join(DTYPES)}")
    if quantization.get("quant_type", "nf4") != "nf4":
        raise UserError(f"{adapter_dir} was trained on a {quantization['quant_type']} base; export re-creates nf4 only")
    base_dir = resolve_model(str(base))
    return TrainingSetup(
        base_dir=base_dir,
        compute_dtype=DTYPES[dtype_name],
        double_quant=True if double_quant is None else double_quant,
        trust_remote_code=bool(run.get("trust_remote_code", False)),
        attn_implementation=str(run.get("attn_implementation", "sdpa")),
        trained_on=str(resolved.get("device", "unknown")),
        unchecked=check_base(adapter_dir, base_dir, resolved.get("model_fingerprint"), base_model is not None,
                             allow_other_base),
    )


def _require_quantization(adapter_dir: Path, dtype_name: Optional[str], double_quant: Optional[bool],
                          needed: bool) -> None:
    """Refuse to guess how training quantized the base when the merge depends on it."""
    missing = [flag for flag, value in (("--bnb_4bit_compute_dtype bfloat16|float16|float32", dtype_name),
                                        ("--bnb_4bit_use_double_quant true|false", double_quant)) if value is None]
    if missing and needed:
        where = f"{adapter_dir} has no {RUN_MARKER}" if not (adapter_dir / RUN_MARKER).is_file() else \
            f"{adapter_dir / RUN_MARKER} does not record it"
        raise UserError(f"{where}, so how training quantized the base is unknown and the NF4 weights it saw cannot "
                        f"be re-created; pass {' and '.join(missing)} as the training run used them, "
                        f"or --merge_base original (without --verify)")


def check_base(adapter_dir: Path, base_dir: Path, recorded: Optional[str], named: bool, allow_other: bool) -> list[str]:
    """Compare the base folder with the fingerprint the run recorded; return what could not be checked.

    Args:
        named: the base came from --base_model (rather than from the run's record).
        allow_other: --allow_other_base: a different base is merged onto, with a notice, not refused.

    Raises:
        UserError: the base is not the model the run was trained on, and `allow_other` is false.
    """
    if not recorded:
        notice_once(f"{adapter_dir} records no fingerprint of its base model: cannot check that {base_dir} is "
                    f"the model the adapter was trained on")
        return ["the base model (no fingerprint recorded)"]
    found = compare(str(recorded), model_fingerprint(base_dir))
    if found == "same":
        return []
    if found == "weights unchecked":
        notice_once(f"{adapter_dir / RUN_MARKER} records the base model's config.json only (an older qlora_kit): "
                    f"{base_dir}'s config matches, its weights cannot be checked")
        return ["the base model's weights (only its config.json was recorded)"]
    what = f"its {found} from the fingerprint in {RUN_MARKER}"
    if allow_other:
        notice_once(f"--allow_other_base: {base_dir} is not the base {adapter_dir} was trained on ({what}); "
                    f"merging onto it anyway")
        return [f"the base model (another one: {what})"]
    subject = f"--base_model {base_dir} is not the model" if named else \
        f"the base model in {base_dir} has changed since it was the model"
    raise UserError(f"{subject} {adapter_dir} was trained on ({what}); "
                    f"pass the base the run used, or --allow_other_base true to merge onto it anyway")


def _adapter_base(adapter_dir: Path) -> Optional[str]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("base_model_name_or_path")
