"""What an export needs to know about the run: the base model, and how training quantized it.

A qlora_kit run folder says it all in run_config.yaml (`resolved:` base_model_dir, compute_dtype,
quantization). A bare PEFT adapter folder is accepted too: the base comes from --base_model or from
adapter_config.json, and the quantization settings from the flags (bfloat16 compute and double
quantization, qlora_kit's GPU defaults, when they are not given; said once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from qlora_kit.errors import UserError
from qlora_kit.export.adapter import ADAPTER_CONFIG
from qlora_kit.log import notice_once
from qlora_kit.model.load import DTYPES
from qlora_kit.sources import resolve_model

RUN_MARKER = "run_config.yaml"  # as qlora_kit.output names it (not imported: it would import peft for nothing)


@dataclass
class RunSettings:
    """The base model folder and the quantization training used."""

    base_dir: Path
    compute_dtype: torch.dtype
    double_quant: bool
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    trained_on: str = "unknown"  # the run's device, e.g. 'cuda' or 'cpu'


def _read_run_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / RUN_MARKER
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML; fix it or pass --base_model and the quantization flags") from None
    return values if isinstance(values, dict) else {}


def run_settings(adapter_dir: Path, base_model: Optional[str] = None, compute_dtype: Optional[str] = None,
                 double_quant: Optional[bool] = None) -> RunSettings:
    """Resolve the base folder and quantization; explicit arguments win over the run's record.

    Raises:
        UserError: the base model cannot be found, or the adapter folder does not exist.
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
    if dtype_name is None:
        dtype_name = "bfloat16"
        notice_once(f"{adapter_dir} has no {RUN_MARKER}: assuming the base was loaded in bfloat16 "
                    f"(pass --bnb_4bit_compute_dtype if training used another)")
    if dtype_name not in DTYPES:
        raise UserError(f"compute dtype {dtype_name} is not one of {', '.join(DTYPES)}")
    if double_quant is None:
        double_quant = bool(quantization.get("double_quant", run.get("bnb_4bit_use_double_quant", True)))
    if quantization.get("quant_type", "nf4") != "nf4":
        raise UserError(f"{adapter_dir} was trained on a {quantization['quant_type']} base; export re-creates nf4 only")
    return RunSettings(
        base_dir=resolve_model(str(base)),
        compute_dtype=DTYPES[dtype_name],
        double_quant=double_quant,
        trust_remote_code=bool(run.get("trust_remote_code", False)),
        attn_implementation=str(run.get("attn_implementation", "sdpa")),
        trained_on=str(resolved.get("device", "unknown")),
    )


def _adapter_base(adapter_dir: Path) -> Optional[str]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("base_model_name_or_path")
