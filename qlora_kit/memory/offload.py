"""Activation offload: the hidden state each checkpointed decoder layer keeps for its recompute goes
to pinned host memory during forward and comes back, prefetched, during backward.

With activation checkpointing a decoder keeps one hidden state per layer (its input) until backward
recomputes that layer: layers x tokens x hidden x 2 bytes, 5.4 GB for a 70B model at 4,096 tokens.
`enable_activation_offload(model, device)` gives every checkpointed layer `ActivationOffloader.checkpoint`
as its checkpoint function (through qlora_kit/model/family.py's `set_checkpoint_function`), which
- in forward runs the layer without keeping anything, and copies its input into pinned host memory
  on a side CUDA stream (the copy overlaps the layer's compute; `record_stream` keeps the allocator
  from reusing the input's memory before the copy ends), so the GPU holds no layer inputs;
- in backward fetches its input back (waiting on the copy's event), starts the host-to-device copy
  of the previous layer's input on the side stream, so it overlaps this layer's recompute and
  backward, then recomputes the layer with the forward's RNG state (LoRA dropout draws the same
  mask) and backpropagates through it.
So at most two layer inputs are on the GPU at once. On CPU the same code runs and the "host copy" is
the tensor itself: a no-op with the same gradients, which is what the CPU tests check.

Why not transformers' `activation_checkpointing_enable(offload=True)` (5.24+): it wraps torch's
`save_on_cpu` around the checkpoint, whose copies run on the compute stream and are not prefetched
(each layer's backward waits for its own host-to-device copy), and it does not exist in transformers
5.17, which pyproject.toml supports. Why not torch's non-reentrant checkpoint with saved-tensor hooks:
that checkpoint keeps its inputs alive in a closure, out of reach of the hooks, so the very tensor
to offload would stay on the GPU. The function here is a reentrant-style checkpoint (an autograd
Function that runs an inner backward), as torch's `use_reentrant=True` checkpoint is.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from qlora_kit.memory.pinned import PinnedArena
from qlora_kit.model.family import checkpointed_layers, set_checkpoint_function


class _Offloaded:
    """One layer input: on the host after forward, back on the device (prefetched) for backward."""

    def __init__(self, host: torch.Tensor, event: Optional[torch.cuda.Event], previous: Optional["_Offloaded"]):
        self.host: Optional[torch.Tensor] = host
        self.event = event
        self.device_copy: Optional[torch.Tensor] = None
        self.previous = weakref.ref(previous) if previous is not None else None


class ActivationOffloader:
    """Moves checkpointed layer inputs to pinned host memory and back, overlapping copies with compute."""

    def __init__(self, device: torch.device, expected_bytes: int = 0) -> None:
        self.on_cuda = device.type == "cuda"
        if self.on_cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if self.on_cuda else None
        self._last: Optional[_Offloaded] = None
        self.offloaded_bytes = 0  # bytes sent to the host, for reports and tests
        # Host copies, on a GPU: reused once every layer input taken has been fetched back (or its graph
        # dropped). Reuse is safe because both directions of every copy run on `copy_stream`, in order.
        self.arena = PinnedArena(pin=True, expected_bytes=expected_bytes) if self.on_cuda else None
        self.live: weakref.WeakSet[_Offloaded] = weakref.WeakSet()
        self.replaced: list[tuple[nn.Module, Callable]] = []

    def disable(self) -> None:
        """Give the layers back the checkpoint function they had before."""
        for module, function in self.replaced:
            set_checkpoint_function(module, function)
        self.replaced.clear()

    def offload(self, tensor: torch.Tensor) -> _Offloaded:
        """Start copying `tensor` to pinned host memory; the caller may drop its reference at once."""
        event = None
        if self.on_cuda:
            if not self.live:
                self.arena.reset()
            host = self.arena.empty(tensor.shape, tensor.dtype)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            tensor.record_stream(self.copy_stream)
        else:
            host = tensor  # already in host memory: nothing to move
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        self._last = _Offloaded(host, event, self._last)
        self.live.add(self._last)
        return self._last

    def prefetch(self, handle: Optional[_Offloaded]) -> None:
        """Start the host-to-device copy of a layer input, on the side stream."""
        if handle is None or handle.device_copy is not None or handle.host is None:
            return
        if not self.on_cuda:
            handle.device_copy = handle.host
            return
        with torch.cuda.stream(self.copy_stream):
            handle.device_copy = handle.host.to(self.device, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record(self.copy_stream)

    def fetch(self, handle: _Offloaded) -> torch.Tensor:
        """The layer input back on the device; starts prefetching the layer before it."""
        self.prefetch(handle)
        tensor = handle.device_copy
        if self.on_cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(handle.event)
            tensor.record_stream(current)
        handle.host = handle.device_copy = None
        self.live.discard(handle)
        self.prefetch(handle.previous() if handle.previous is not None else None)
        return tensor

    def checkpoint(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """Drop-in for transformers' checkpoint function: `function(*args, **kwargs)`, offloaded.

        The first floating-point tensor argument that requires grad is the hidden state to offload;
        calls where another positional tensor requires grad go to torch's checkpoint unchanged.
        """
        index = next((i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad), None)
        others_need_grad = any(torch.is_tensor(a) and a.requires_grad for i, a in enumerate(args) if i != index)
        if index is None or others_need_grad or not torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

        def run(hidden: torch.Tensor) -> Any:
            return function(*args[:index], hidden, *args[index + 1:], **kwargs)

        return _OffloadedCheckpoint.apply(run, self, args[index])


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without keeping activations; keep its input on the host; recompute in backward."""

    @staticmethod
    def forward(ctx, run: Callable, offloader: ActivationOffloader, hidden: torch.Tensor) -> Any:
        ctx.run, ctx.offloader = run, offloader
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(offloader.device) if offloader.on_cuda else None
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.handle = offloader.offload(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        hidden = ctx.offloader.fetch(ctx.handle).detach().requires_grad_(True)
        devices = [ctx.offloader.device] if ctx.offloader.on_cuda else []
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.offloader.device)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                outputs = ctx.run(hidden)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, None, hidden.grad


def enable_activation_offload(model: nn.Module, device: torch.device, expected_bytes: int = 0) -> ActivationOffloader:
    """Offload the inputs of every checkpointed layer of `model` (gradient checkpointing must be on).

    `expected_bytes`: the layer inputs of one micro-batch, as the memory plan counts them (sizes the
    pinned slabs; 0 if unknown).

    Returns:
        The offloader, whose `offloaded_bytes` counts what went to the host; `disable()` undoes it.
    """
    offloader = ActivationOffloader(device, expected_bytes)
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError("activation offload needs gradient checkpointing: enable it first")
    for module in layers:
        offloader.replaced.append((module, set_checkpoint_function(module, offloader.checkpoint)))
    return offloader
