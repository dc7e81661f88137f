"""Pinned host memory in power-of-two slabs: exact tensors, no round-up, reused after reset."""

import pytest
import torch

from qlora_kit.memory.pinned import ALIGN, PinnedArena, aligned


def _layer_tensor_bytes(hidden, intermediate, heads, kv_heads):
    """Packed NF4 weights and 8-bit block scales of one Llama decoder layer, as the streamer holds them."""
    kv = kv_heads * hidden // heads
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
              (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return [n for out, inp in shapes for n in (out * inp // 2, out * inp // 64)]


def _is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0


def test_tensors_are_separate_aligned_and_keep_their_values():
    arena = PinnedArena(pin=False, expected_bytes=10_000)
    values = [torch.arange(n, dtype=torch.float32) for n in (3, 700, 1, 1500)]
    tensors = []
    for value in values:
        tensors.append(arena.empty(value.shape, value.dtype))
        tensors[-1].copy_(value)
    for tensor, value in zip(tensors, values):
        assert torch.equal(tensor, value)
        assert (tensor.data_ptr() - tensor.untyped_storage().data_ptr()) % ALIGN == 0
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert all(_is_power_of_two(slab.numel()) for slab in arena.slabs)


def test_reset_hands_out_the_same_memory_again():
    arena = PinnedArena(pin=False)
    first = [arena.empty((1000,), torch.bfloat16).data_ptr() for _ in range(5)]
    reserved = arena.reserved_bytes
    arena.reset()
    again = [arena.empty((1000,), torch.bfloat16).data_ptr() for _ in range(5)]
    assert again == first and arena.reserved_bytes == reserved


def test_streamed_70b_layers_take_half_a_percent_more_than_their_bytes():
    """torch's pinned allocator would take 512 MiB for each 421 MiB layer (+22%); the slabs hold them in 0.5% more."""
    sizes = _layer_tensor_bytes(8192, 28672, 64, 8) * 46  # the streamed layers of a 70B run on 24 GiB
    needed = sum(aligned(n) for n in sizes)
    arena = PinnedArena(pin=False, expected_bytes=needed, device="meta")  # counts, allocates nothing
    for n in sizes:
        arena.empty((n,), torch.uint8)
    assert all(_is_power_of_two(slab.numel()) for slab in arena.slabs)
    assert needed <= arena.reserved_bytes <= 1.01 * needed
    per_layer = sum(_layer_tensor_bytes(8192, 28672, 64, 8))
    assert (1 << (per_layer - 1).bit_length()) > 1.2 * per_layer  # what one pinned block per layer costs


def test_a_tensor_larger_than_a_slab_gets_a_slab_of_its_own():
    arena = PinnedArena(pin=False, max_slab_bytes=4096)
    big = arena.empty((5000,), torch.uint8)
    assert big.numel() == 5000 and arena.reserved_bytes == 8192


@pytest.mark.gpu
def test_pinned_slabs_copy_to_the_gpu_asynchronously_and_back():
    arena = PinnedArena(pin=True, expected_bytes=3 * (1 << 20))
    tensors = [arena.empty((n,), torch.bfloat16) for n in (1 << 19, 1000, 12345)]
    assert all(t.is_pinned() for t in tensors)
    stream = torch.cuda.Stream()
    for t in tensors:
        t.copy_(torch.randn(t.shape, dtype=t.dtype))
    with torch.cuda.stream(stream):
        on_gpu = [t.to("cuda", non_blocking=True) for t in tensors]
    stream.synchronize()
    assert all(torch.equal(g.cpu(), t) for g, t in zip(on_gpu, tensors))
