import pytest
from torch import nn

from qlora_kit.errors import UserError
from qlora_kit.model.targets import find_projections
from tiny_models import ARCHITECTURES, EXPECTED_PROJECTIONS, tiny_model


@pytest.mark.parametrize("architecture", sorted(EXPECTED_PROJECTIONS))
def test_finds_every_attention_and_mlp_projection(architecture):
    projections = find_projections(tiny_model(architecture))
    assert sorted(projections.names) == sorted(EXPECTED_PROJECTIONS[architecture])
    assert projections.num_blocks == 2
    assert all("attn" in name for name in projections.attention)


def test_never_lm_head_or_embeddings():
    for architecture in ARCHITECTURES:
        names = find_projections(tiny_model(architecture)).names
        assert not any("lm_head" in n or "embed" in n or n.startswith("wte") for n in names), architecture


def test_moe_experts_adapted_but_not_the_router():
    names = find_projections(tiny_model("mixtral")).names
    assert not any(n.endswith(".gate") for n in names), names
    assert any("self_attn.q_proj" == n for n in names)


def test_model_without_projections_is_a_clear_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
            self.dense_thing = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(UserError, match="no attention or MLP projection found.*dense_thing"):
        find_projections(Odd())
