"""Which Linear modules are the attention and MLP projections, for any decoder architecture.

For a family qlora_kit knows (qlora_kit/model/family.py) the decoder layers and projections are
the family's, checked to be there. Any other model's are found from the model itself: the decoder
blocks are the `ModuleList` holding the most parameters, and every linear layer inside a block (nn.Linear,
bitsandbytes' 4-bit and 8-bit layers, GPT-2's Conv1D) whose path runs through an attention or MLP
module is a projection. MoE routers are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from qlora_kit.errors import UserError
from qlora_kit.model.family import Family, check_structure, family_of

ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "experts", "moe")
ROUTER_NAMES = ("router", "gate")  # a 'gate' beside 'experts' routes tokens; it is not a projection


@dataclass
class Projections:
    """The projections of a model's decoder blocks, named relative to a block."""

    blocks_path: str
    num_blocks: int
    attention: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return self.attention + self.mlp

    def peft_target_regex(self) -> str:
        """A regex that peft matches in full against module names: only these, only in the blocks."""
        alternatives = "|".join(re.escape(name) for name in self.names)
        return rf"{re.escape(self.blocks_path)}\.\d+\.({alternatives})"


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and its bitsandbytes subclasses, and for GPT-2 style Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _family_blocks(model: nn.Module, family: Family) -> tuple[str, nn.ModuleList]:
    """The decoder blocks the family names, and their path in `model` (which may be a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_structure(base, family)
    blocks = base.get_submodule(family.layers)
    return next(name for name, module in model.named_modules() if module is blocks), blocks


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: its family's, else its `ModuleList` holding the most parameters."""
    family = family_of(model)
    if family is not None:
        return _family_blocks(model, family)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of decoder blocks; it is not a decoder LM qlora_kit knows")

    def size(item: tuple[str, nn.ModuleList]) -> int:
        return sum(p.numel() for p in item[1].parameters())

    return max(lists, key=size)


def _kind(relative_name: str, block: nn.Module) -> str | None:
    parts = relative_name.lower().split(".")
    leaf, parents = parts[-1], parts[:-1]
    parent = block.get_submodule(".".join(relative_name.split(".")[:-1])) if parents else block
    if leaf in ROUTER_NAMES and any("experts" in name for name, _ in parent.named_children()):
        return None
    if any(word in part for part in parents for word in ATTENTION_WORDS):
        return "attention"
    if any(word in part for part in parents for word in MLP_WORDS):
        return "mlp"
    return None


def find_projections(model: nn.Module) -> Projections:
    """Find every attention and MLP projection inside the decoder blocks.

    Raises:
        UserError: no projection was found; the message lists the linear modules seen.
    """
    blocks_path, blocks = find_decoder_blocks(model)
    found = Projections(blocks_path=blocks_path, num_blocks=len(blocks))
    family = family_of(model)
    if family is not None:
        found.attention, found.mlp = list(family.attention), list(family.mlp)
        return found
    seen: list[str] = []
    for block in blocks:
        for name, module in block.named_modules():
            if not name or not is_linear(module) or name in seen:
                continue
            seen.append(name)
            kind = _kind(name, block)
            if kind == "attention":
                found.attention.append(name)
            elif kind == "mlp":
                found.mlp.append(name)
    if not found.names:
        listed = ", ".join(seen) if seen else "none"
        raise UserError(
            f"no attention or MLP projection found in {type(model).__name__}: the linear modules in its "
            f"blocks ({blocks_path}) are: {listed}; name the ones to adapt with --lora_target_modules"
        )
    return found


def check_named_targets(model: nn.Module, names: list[str]) -> None:
    """Refuse module names in --lora_target_modules that the model does not have."""
    leaves = {name.split(".")[-1] for name, _ in model.named_modules() if name}
    full = {name for name, _ in model.named_modules()}
    missing = [n for n in names if n not in leaves and not any(f.endswith("." + n) or f == n for f in full)]
    if missing:
        linear = sorted({name.split(".")[-1] for name, m in model.named_modules() if is_linear(m)})
        raise UserError(
            f"--lora_target_modules names {', '.join(missing)}, which this model lacks; "
            f"its linear modules are: {', '.join(linear)}"
        )
