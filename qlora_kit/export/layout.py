"""What the base checkpoint holds and what training did to each tensor, without loading a weight.

The tensors, shapes and byte offsets come from the safetensors headers. Which of them training held
in NF4 comes from transformers itself: the model is built from config.json on the meta device and
its linear layers are replaced as 4-bit loading replaces them (model/quantized.py: so lm_head,
embeddings, norms and any module transformers skips stay unquantized, as in training).
The same skeleton tells GPT-2 style Conv1D weights (stored [in, out]) and tied embeddings apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qlora_kit.errors import UserError
from qlora_kit.io.safetensors import INDEX_NAME, WEIGHTS_NAME, StoredTensor, model_key, read_layout, shard_files
from qlora_kit.model.quantized import replace_quantized_linears


@dataclass
class BaseTensor:
    """One tensor of the base checkpoint and what training did with it."""

    stored: StoredTensor
    model_name: Optional[str]  # the parameter's name in the model, when the checkpoint key maps to one
    quantized: bool = False  # training held it in NF4
    transposed: bool = False  # a Conv1D weight, stored [in, out]

    @property
    def name(self) -> str:
        return self.stored.spec.name

    @property
    def module(self) -> Optional[str]:
        """The module this tensor is the weight of, if it is one."""
        if self.model_name is None or not self.model_name.endswith(".weight"):
            return None
        return self.model_name.removesuffix(".weight")


@dataclass
class BaseLayout:
    """The base model folder: its config, its tensors in file order, and its tied embeddings."""

    folder: Path
    config: dict
    tensors: list[BaseTensor]
    input_embedding: Optional[str] = None  # model parameter names
    output_embedding: Optional[str] = None
    tied: bool = False
    by_model_name: dict[str, BaseTensor] = field(default_factory=dict)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(t.stored.spec.nbytes for t in self.tensors)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order."""
    files = shard_files(folder, WEIGHTS_NAME)
    if files:
        return files
    raise UserError(f"base model folder {folder} holds no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}); "
                    f"load and save it once with transformers to convert it")


def meta_model(folder: Path, compute_dtype: torch.dtype, double_quant: bool, trust_remote_code: bool):
    """The model built on the meta device, its linear layers replaced as 4-bit loading replaces them."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    replace_quantized_linears(model, BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    ))
    return model


def describe_base(folder: Path, compute_dtype: torch.dtype, double_quant: bool,
                  trust_remote_code: bool = False) -> BaseLayout:
    """Read the base folder's headers and classify every tensor."""
    import bitsandbytes as bnb

    stored = [tensor for file in checkpoint_files(folder) for tensor in read_layout(file)]
    model = meta_model(folder, compute_dtype, double_quant, trust_remote_code)
    modules = dict(model.named_modules())
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    layout = BaseLayout(folder, json.loads((folder / "config.json").read_text()), [])
    for tensor in stored:
        model_name = model_key(tensor.spec.name, names, model.base_model_prefix)
        base = BaseTensor(tensor, model_name)
        if model_name is not None and model_name.endswith(".weight"):
            module = modules.get(model_name.removesuffix(".weight"))
            source = getattr(module, "source_cls", type(module))
            base.quantized = isinstance(module, bnb.nn.Linear4bit)
            base.transposed = source.__name__ == "Conv1D"
            layout.by_model_name[model_name] = base
        layout.tensors.append(base)
    _find_embeddings(model, modules, layout)
    missing = [name + ".weight" for name, module in modules.items()
               if isinstance(module, bnb.nn.Linear4bit) and name + ".weight" not in layout.by_model_name]
    if missing:
        raise UserError(f"the base checkpoint in {folder} has no tensor for {missing[0]} (and {len(missing) - 1} "
                        f"more), which training quantized; export cannot match its tensor names to the model")
    return layout


def _find_embeddings(model, modules: dict, layout: BaseLayout) -> None:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    by_module = {id(module): name for name, module in modules.items()}
    if inputs is not None:
        layout.input_embedding = by_module[id(inputs)] + ".weight"
    if outputs is not None:
        layout.output_embedding = by_module[id(outputs)] + ".weight"
    layout.tied = inputs is not None and outputs is not None and outputs.weight is inputs.weight
