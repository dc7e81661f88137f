"""Which Linear layers 4-bit loading quantizes, and which stay in the compute dtype.

transformers' bitsandbytes quantizer decides it (`unquantized_modules`: the output embeddings, tied
weights, the last module, a model's `_keep_in_fp32_modules`); the streaming loader, the export's
layout and the memory planner all ask here, so they cannot disagree with loading or each other.
bitsandbytes itself is imported only when modules are replaced, so the memory planner stays light.
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module


def unquantized_modules(model: nn.Module, skip_modules: Optional[list[str]] = None) -> list[str]:
    """The module-name patterns 4-bit loading keeps in the compute dtype, as transformers chooses them.

    Args:
        model: an unquantized model (on the meta device or not).
        skip_modules: a BitsAndBytesConfig's `llm_int8_skip_modules`, when it names any.
    """
    return Bnb4BitHfQuantizer.get_modules_to_not_convert(
        model, skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear (and GPT-2 style Conv1D) modules of an unquantized model that 4-bit loading quantizes."""
    skip = unquantized_modules(model)
    return [(name, module) for name, module in model.named_modules()
            if (type(module) is nn.Linear or type(module).__name__ == "Conv1D") and should_convert_module(name, skip)]


def replace_quantized_linears(model: PreTrainedModel, bnb_config: BitsAndBytesConfig) -> Bnb4BitHfQuantizer:
    """Swap a meta model's quantized Linear modules for bitsandbytes `Linear4bit`, as loading does.

    Returns:
        the quantizer loading would hold (`model.hf_quantizer`).
    """
    from transformers.integrations import replace_with_bnb_linear

    skip = unquantized_modules(model, bnb_config.llm_int8_skip_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)
    return Bnb4BitHfQuantizer(bnb_config)
