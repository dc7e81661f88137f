"""Layer streaming on CPU ("host" and "device" both the CPU): same losses and LoRA gradients, and
never more than the planned number of layers materialised, in forward, recompute and backward."""

import bitsandbytes as bnb
import pytest
import torch

from qlora_kit.config import ModelArguments, parse
from qlora_kit.errors import UserError
from qlora_kit.memory.pinned import aligned
from qlora_kit.memory.stream import LayerStreamer, materialised_layers, setup_streaming
from qlora_kit.model.load import load_quantized_model
from qlora_kit.model.targets import find_decoder_blocks
from stream_models import CPU, lora_model, one_thread  # noqa: F401 - one_thread is an autouse fixture
from tiny_models import save_tiny_model
LAYERS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("stream") / "llama", "llama", num_hidden_layers=LAYERS)


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [True, False])
def test_losses_and_lora_grads_equal_without_streaming(folder, checkpointing):
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, _ = lora_model(folder, checkpointing=checkpointing)
    streamed, streamer = lora_model(folder, resident_layers=2, checkpointing=checkpointing)
    assert streamer is not None and len(streamer.streamed) == LAYERS - 2
    for _ in range(2):  # the second pass starts from what the first left on the device
        loss_a, grads_a = loss_and_grads(plain, ids)
        loss_b, grads_b = loss_and_grads(streamed, ids)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == 7 * LAYERS * 2
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, streamed(input_ids=ids).logits)
    # LoRA weights and gradients live on the device, never streamed
    assert all(p.device == CPU and p.untyped_storage().nbytes() > 0 for p in streamed.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [True, False])
def test_cuda_streaming_gives_the_same_losses_and_grads(folder, checkpointing):
    """The real thing: pinned slabs, copies on a side stream, storage freed and refilled on the GPU."""
    cuda = torch.device("cuda")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1)).to(cuda)
    plain, _ = lora_model(folder, checkpointing=checkpointing, device=cuda)
    streamed, streamer = lora_model(folder, resident_layers=2, checkpointing=checkpointing, device=cuda)
    assert streamer.cuda and all(slab.is_pinned() for slab in streamer.arena.slabs)
    for _ in range(3):  # later passes start from what the earlier left on the device
        loss_a, grads_a = loss_and_grads(plain, ids)
        loss_b, grads_b = loss_and_grads(streamed, ids)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert streamer.stats.max_in_flight <= 2 and streamer.stats.copies > 0
    torch.cuda.synchronize()
    assert len([i for i in materialised_layers(streamed) if i in streamer.streamed]) <= 2


class Sampler:
    """Counts materialised layers (by their storage) at every projection call and gradient."""

    def __init__(self, model):
        self.model = model
        self.phase = "forward"
        self.seen: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.register_forward_pre_hook(self.on_forward)
                module.register_forward_hook(self.on_output)

    def sample(self, phase):
        self.seen[phase] = max(self.seen.get(phase, 0), len(self.streamed_materialised()))

    def streamed_materialised(self):
        return [i for i in materialised_layers(self.model) if i in self.streamed]

    def on_forward(self, module, args):
        self.sample("recompute" if self.phase == "backward" else "forward")

    def on_output(self, module, args, output):
        if output.requires_grad:
            output.register_hook(lambda grad: self.sample("backward"))


@pytest.mark.parametrize("in_flight,checkpointing", [(1, True), (2, True), (3, False)])
def test_at_most_the_planned_layers_materialised(folder, in_flight, checkpointing):
    model, streamer = lora_model(folder, resident_layers=1, in_flight=in_flight, checkpointing=checkpointing)
    sampler = Sampler(model)
    sampler.streamed = set(streamer.streamed)
    ids = torch.randint(0, 500, (2, 16))
    for _ in range(2):
        sampler.phase = "forward"
        loss = model(input_ids=ids, labels=ids).loss
        sampler.phase = "backward"
        loss.backward()
    phases = {"forward", "backward"} | ({"recompute"} if checkpointing else set())
    assert set(sampler.seen) == phases
    assert all(1 <= count <= in_flight for count in sampler.seen.values()), sampler.seen
    assert streamer.stats.max_in_flight <= in_flight and streamer.stats.evictions == 0
    # each pass copies every streamed layer twice at most (forward, backward), less what is kept across
    assert streamer.stats.copies <= 2 * 2 * len(streamer.streamed)


def test_eval_under_no_grad_frees_every_layer_but_the_prefetched(folder):
    model, streamer = lora_model(folder, resident_layers=0, in_flight=2)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 500, (1, 8)))
    assert len(materialised_layers(model)) <= 2
    assert streamer.stats.evictions == 0


def test_close_brings_every_layer_back(folder):
    model, streamer = lora_model(folder, resident_layers=2, in_flight=2)
    ids = torch.randint(0, 500, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    streamer.close(materialise=True)
    assert materialised_layers(model) == list(range(LAYERS)) and streamer.arena.reserved_bytes == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_streamed_layers_are_held_in_host_memory_without_round_up(folder):
    model, streamer = lora_model(folder, resident_layers=2)
    weights = [m.weight for i in streamer.streamed for m in streamer.layers[i].modules]
    host = [t for i in streamer.streamed for t in streamer.layers[i].host]
    streamed_bytes = sum(aligned(t.numel() * t.element_size()) for t in host)  # each tensor 512-byte aligned
    assert all(w.untyped_storage().nbytes() == 0 for w in weights)  # the device copies are gone
    assert streamed_bytes <= streamer.arena.reserved_bytes <= 1.05 * streamed_bytes


def test_in_flight_must_be_positive(folder):
    model = load_quantized_model(folder, ModelArguments(model_name_or_path=str(folder)), torch.float32, CPU)
    with pytest.raises(Exception, match="layers_in_flight"):
        LayerStreamer(model, [1], CPU, layers_in_flight=0)
    assert setup_streaming(model, -1, 2, CPU) is None
    assert setup_streaming(model, LAYERS, 2, CPU) is None
    _, blocks = find_decoder_blocks(model)
    assert len(blocks) == LAYERS


@pytest.mark.parametrize("argv, message", [
    (["--resident_layers", "-2"], "--resident_layers must be -1"),
    (["--layers_in_flight", "0"], "--layers_in_flight must be at least 1"),
])
def test_streaming_fields_are_checked(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)
    config = parse(["--resident_layers", "20", "--quantized_cache", "nf4"])
    assert config.stream.resident_layers == 20 and config.to_dict()["quantized_cache"] == "nf4"
