"""A trained model ready to generate: a run folder (NF4 base + adapter), a merged folder, or a base alone.

A run folder is loaded as training loaded it: the base the run recorded (checked against its
fingerprint, export/settings.py), quantized to NF4 with the run's compute dtype and double
quantization, and, when the run's memory plan streamed decoder layers from host RAM, streamed the
same way (so an adapter trained on a card too small for its base runs there too, slowly); the
adapter goes on top through peft, and `disable_adapter()` gives the base without a second copy.
A merged folder or a base alone is loaded dense, in bfloat16 on a GPU and float32 on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM

from qlora_kit.config import ModelArguments, StreamArguments
from qlora_kit.errors import UserError
from qlora_kit.export.adapter import ADAPTER_CONFIG
from qlora_kit.export.settings import _read_run_config, training_setup
from qlora_kit.log import logger
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.memory.stream import setup_streaming
from qlora_kit.model.stream_load import load_model
from qlora_kit.sources import resolve_model


@dataclass
class LoadedModel:
    """The model in eval mode, its tokenizer (padding on the left, for generation), and whether it has an adapter."""

    model: Any
    tokenizer: Any
    has_adapter: bool
    device: torch.device


def choose_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tokenizer_for(folder: Path, fallback: Path, trust_remote_code: bool):
    tokenizer = load_tokenizer(folder if (folder / "tokenizer_config.json").is_file() else fallback, trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"the tokenizer of {folder} has no chat template; generate renders chats through it")
    return tokenizer


def _stream_settings(adapter_dir: Path, resident_layers: int, device: torch.device) -> StreamArguments:
    """The run's layer streaming (from its recorded memory plan), or the --resident_layers given."""
    if device.type != "cuda":
        return StreamArguments()
    plan = (_read_run_config(adapter_dir).get("resolved") or {}).get("memory_plan") or {}
    if resident_layers < 0 and plan.get("streamed_layers"):
        resident_layers = plan["resident_layers"]
        logger.info(f"streaming {plan['streamed_layers']} decoder layers from host RAM, as the run's memory plan did")
    return dataclasses.replace(StreamArguments(), resident_layers=resident_layers,
                               layers_in_flight=max(1, plan.get("layers_in_flight") or 2))


def load_run(adapter_dir: Path, base_model: Optional[str], resident_layers: int = -1) -> LoadedModel:
    """The run's NF4 base with its adapter, as training loaded them.

    Raises:
        UserError: the folder holds no adapter, or its base cannot be found or is not the base the run used.
    """
    from peft import PeftModel

    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"--adapter_dir {adapter_dir} holds no adapter ({ADAPTER_CONFIG}); point it at a finished "
                        f"run folder, or pass a merged model with --model_name_or_path")
    settings = training_setup(adapter_dir, base_model)
    device = choose_device()
    model_args = ModelArguments(model_name_or_path=str(settings.base_dir), trust_remote_code=settings.trust_remote_code,
                                bnb_4bit_use_double_quant=settings.double_quant,
                                attn_implementation=settings.attn_implementation)
    stream = _stream_settings(adapter_dir, resident_layers, device)
    base = load_model(settings.base_dir, model_args, stream, settings.compute_dtype, device)
    setup_streaming(base, stream.resident_layers, stream.layers_in_flight, device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tokenizer = _tokenizer_for(adapter_dir, settings.base_dir, settings.trust_remote_code)
    return LoadedModel(model, tokenizer, True, device)


def load_plain(name_or_path: str) -> LoadedModel:
    """A merged folder or a base model alone, dense."""
    folder = resolve_model(name_or_path)
    device = choose_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()
    return LoadedModel(model, _tokenizer_for(folder, folder, False), False, device)
