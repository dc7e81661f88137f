"""Pinned host memory without the round-up: host tensors carved out of slabs of exact power-of-two sizes.

Why not `torch.empty(..., pin_memory=True)` for each tensor: pinned memory comes from torch's caching
host allocator, which rounds every request up to the next power of two and caches freed blocks by
that size class (ATen/core/CachingHostAllocator.h, torch 2.13). A 70B decoder layer's 420.7 MiB of
NF4 weights and block scales would take 512 MiB (21.7% more than the memory plan counts), and layer
inputs whose length changes from batch to batch would leave cached blocks in several size classes
(up to twice the plan). Its `pinned_max_round_threshold_mb` setting turns the rounding off but keeps
looking up free blocks by the rounded-up size class, so a freed block could be handed to a larger
request; this module leaves that setting alone and asks the allocator only for powers of two, which
it gives as they are.

`PinnedArena.empty(shape, dtype)` places a tensor in the first slab with room (each tensor starts a
multiple of 512 bytes into its slab; pinned slabs start on a page) and opens a new slab when none
has: the largest power of two that the bytes still expected fill (`expected_bytes`, the caller's
count; 0 if unknown), at least the tensor's own size rounded up and at most `max_slab_bytes`.
`reset()` hands the same slabs out again: the caller says every tensor it got is dead (on a GPU: that
no copy still queued reads or writes one; the callers here order their copies on one stream, so a
new copy waits for the old).
"""

from __future__ import annotations

import torch

ALIGN = 512  # bytes; every tensor starts a multiple of this into its slab
MAX_SLAB_BYTES = 1 << 30


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _power_of_two_at_least(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length()


def _power_of_two_at_most(nbytes: int) -> int:
    return 1 << (max(1, nbytes).bit_length() - 1)


class PinnedArena:
    """Host tensors in pinned slabs (plain host memory with `pin=False`, or none on the meta device)."""

    def __init__(self, pin: bool, expected_bytes: int = 0, max_slab_bytes: int = MAX_SLAB_BYTES,
                 device: str = "cpu"):
        self.pin = pin
        self.device = device
        self.max_slab_bytes = max_slab_bytes
        self.slabs: list[torch.Tensor] = []
        self.used: list[int] = []
        self.expected_bytes = expected_bytes
        self.placed_bytes = 0

    @property
    def reserved_bytes(self) -> int:
        """Host memory the slabs hold."""
        return sum(slab.numel() for slab in self.slabs)

    def empty(self, shape: torch.Size | tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of `shape` and `dtype`, living in one of the slabs."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        need = aligned(nbytes)
        slab = next((i for i, s in enumerate(self.slabs) if s.numel() - self.used[i] >= need), None)
        if slab is None:
            slab = self._open_slab(need)
        start = self.used[slab]
        self.used[slab] += need
        self.placed_bytes += need
        return self.slabs[slab][start:start + nbytes].view(dtype).view(shape)

    def reset(self, expected_bytes: int | None = None) -> None:
        """Every tensor handed out is dead: start again from the beginning of every slab."""
        self.used = [0] * len(self.slabs)
        self.placed_bytes = 0
        if expected_bytes is not None:
            self.expected_bytes = expected_bytes

    def _open_slab(self, need: int) -> int:
        size = self.max_slab_bytes
        if self.expected_bytes:  # the last slabs only as large as what is still to come
            still_expected = max(self.expected_bytes - self.placed_bytes, need)
            size = min(size, _power_of_two_at_most(still_expected))
        size = max(size, _power_of_two_at_least(need))
        pin = self.pin and self.device == "cpu"
        self.slabs.append(torch.empty(size, dtype=torch.uint8, device=self.device, pin_memory=pin))
        self.used.append(0)
        return len(self.slabs) - 1
