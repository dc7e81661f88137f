"""Layer streaming: frozen NF4 decoder layers wait in pinned host RAM and reach the GPU just in time.

What streams: for each streamed decoder layer, the packed NF4 weight of every bitsandbytes
`Linear4bit` and its 8-bit block scales (`quant_state.absmax`), all but kilobytes of the layer, held
in pinned host memory (`qlora_kit.memory.pinned`: slabs of exact power-of-two sizes, which torch's
pinned allocator does not round up; 0.5% over the layers' bytes for 46 streamed 70B layers, where
one pinned block per layer took 21.7% more). The rest (norms, biases, the tiny second-level
quantization state) and all LoRA weights, their gradients and the optimizer state stay on the GPU.

How: the module's own tensors stay in place and only their storage comes and goes
(`untyped_storage().resize_()`, as FSDP does for unsharded parameters). bitsandbytes' matmul
keeps a view of the weight for its backward; since the view shares the storage, freeing it
really frees the memory and refilling it before the backward makes the view valid again. Copies
run on a side CUDA stream into memory allocated on that stream; the compute stream waits on the
copy's event just before the layer runs, and `record_stream` keeps the allocator from reusing
the memory while queued kernels still read it. On a CPU-only machine "host" and "device" are
both the CPU and copies are synchronous, which is how the tests check the schedule.

When, with gradient checkpointing or without: a forward pre-hook on each decoder layer
materialises it and prefetches the next streamed layers; a forward post-hook frees it. In the
backward, a gradient hook on each layer's input (the output of the layer before) fires once a
layer's backward is complete: it frees that layer and materialises the one below, before its
recompute and backward start; a hook on the last layer's output starts the backward sequence.
The last streamed layer is kept from the forward into the backward, and the first one from the
backward into the next forward. At most `layers_in_flight` streamed layers are on the GPU at any
moment (including those being copied). `qlora_kit.memory.reorder` drives the same streamer by
hand to run all micro-batches of an optimizer step through a layer before the next.

Why these hooks and not FSDP2: FSDP2 (`fully_shard` with `CPUOffloadPolicy`) on
a single device would also carry over to several GPUs. On CPU (gloo, world size 1) it accepts a
`Linear4bit`: the weight becomes a plain DTensor and bitsandbytes restores its `quant_state` from
the module, so forward and backward match. But (1) the offload policy covers a whole FSDP unit,
gradients included, and runs the optimizer step on the CPU, while the LoRA weights, their
gradients and optimizer state must stay on the GPU: each base projection would need its own unit
(7 per layer); (2) only parameters move, so the 4-bit block scales (3% of the bytes) stay on the
GPU; (3) it needs a process group even on one GPU; (4) keeping a layer through every micro-batch
of a step (layer-major order) means driving FSDP2's unshard/reshard by hand anyway. The hooks here
are short and keep bitsandbytes' own modules untouched. tools/bench_70b.py probes FSDP2's
CPU offload on a GPU (correctness, where the LoRA gradients end up, time and peak memory against
these hooks) and docs/benchmarks.md records its answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import bitsandbytes as bnb
import torch
from torch import nn

from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.memory.pinned import PinnedArena, aligned
from qlora_kit.model.bnb_cpu import canonical_weight, keep_canonical_layout
from qlora_kit.model.stream_load import streamed_layer_indices
from qlora_kit.model.targets import find_decoder_blocks


@dataclass
class StreamStats:
    """What the streamer did: copies, bytes, the most layers on the device, time waiting on copies."""

    copies: int = 0
    bytes_copied: int = 0
    max_in_flight: int = 0
    evictions: int = 0
    wait_s: float = 0.0
    copy_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class _Layer:
    """One streamed layer: its 4-bit modules, their host copies, and where the layer stands."""

    index: int
    modules: list[bnb.nn.Linear4bit]
    host: list[torch.Tensor]  # in the streamer's pinned arena
    state: str = "away"  # away | copying | here
    event: object = None
    timing: list = field(default_factory=list)

    def device_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for module in self.modules:
            tensors += [module.weight, module.weight.quant_state.absmax]
        return tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)


def storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _freed_on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` as a device tensor whose storage is freed (0 bytes); its own storage when already there."""
    owns_storage = tensor.storage_offset() == 0 and storage_bytes(tensor) == tensor.numel() * tensor.element_size()
    if tensor.device != device or not owns_storage:
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    tensor.untyped_storage().resize_(0)
    return tensor


class LayerStreamer:
    """Streams the given decoder layers of a model from host RAM to `device`."""

    def __init__(self, model: nn.Module, streamed: Iterable[int], device: torch.device,
                 layers_in_flight: int = 2, measure: bool = False, expected_host_bytes: int = 0):
        """`expected_host_bytes`: what layers streamed later with `stream_layer` will take, if any."""
        if layers_in_flight < 1:
            raise UserError(f"--layers_in_flight must be at least 1, got {layers_in_flight}")
        self.model = model
        self.device = device
        self.limit = layers_in_flight
        self.measure = measure
        _, self.blocks = find_decoder_blocks(model)
        self.layers: dict[int, _Layer] = {}
        self.held: set[int] = set()
        self.driven = False  # True while the layer-major driver moves layers itself
        self.stats = StreamStats()
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._hooks = []
        streamed = sorted(streamed)
        self.arena = PinnedArena(pin=self.cuda, expected_bytes=self._host_bytes(streamed) + expected_host_bytes)
        for index in streamed:
            self.stream_layer(index)
        self._install_hooks()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # the first layer's input gradient ends its backward

    # ---- set-up -------------------------------------------------------------------------------
    def _host_sources(self, index: int) -> tuple[list[bnb.nn.Linear4bit], list[torch.Tensor]]:
        """A layer's 4-bit modules, and the tensors of theirs that stream: packed weights and block scales."""
        modules = [m for m in self.blocks[index].modules() if isinstance(m, bnb.nn.Linear4bit)]
        if not modules:
            raise UserError(f"decoder layer {index} has no 4-bit projection to stream")
        return modules, [t for m in modules for t in (canonical_weight(m.weight)[0], m.weight.quant_state.absmax)]

    def _host_bytes(self, indices: list[int]) -> int:
        return sum(aligned(t.numel() * t.element_size()) for i in indices for t in self._host_sources(i)[1])

    def stream_layer(self, index: int) -> None:
        """Copy a layer's 4-bit weights into pinned host memory; leave storage-less tensors behind."""
        keep_canonical_layout(self.blocks[index])  # bitsandbytes' CPU eval path would repack in place
        modules, sources = self._host_sources(index)
        for module in modules:
            state = module.weight.quant_state
            state.code = state.code.to(self.device)  # the small part of the state stays on the device
            if state.nested:
                state.offset = state.offset.to(self.device)
                state.state2.absmax = state.state2.absmax.to(self.device)
                state.state2.code = state.state2.code.to(self.device)
        host = []
        for tensor in sources:
            host.append(self.arena.empty(tensor.shape, tensor.dtype))
            host[-1].copy_(tensor)
        for module in modules:
            module.weight.data = _freed_on_device(module.weight.data, self.device)
            module.weight.quant_state.absmax = _freed_on_device(module.weight.quant_state.absmax, self.device)
        self.layers[index] = _Layer(index, modules, host)

    def _install_hooks(self) -> None:
        for index, layer in enumerate(self.blocks):
            self._hooks.append(layer.register_forward_pre_hook(self._pre_forward(index), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._post_forward(index), with_kwargs=True))

    @property
    def streamed(self) -> list[int]:
        return sorted(self.layers)

    # ---- moving layers ------------------------------------------------------------------------
    def in_flight(self) -> list[int]:
        return [i for i, layer in self.layers.items() if layer.state != "away"]

    def _start_copy(self, index: int) -> None:
        layer = self.layers[index]
        if layer.state != "away":
            return
        if len(self.in_flight()) >= self.limit:
            self._evict(keep=index)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                start = self._event(self.copy_stream)
                for tensor, host in zip(layer.device_tensors(), layer.host):
                    tensor.untyped_storage().resize_(host.numel() * host.element_size())
                    tensor.copy_(host, non_blocking=True)
                layer.event = self.copy_stream.record_event(torch.cuda.Event(enable_timing=self.measure))
                if self.measure:
                    layer.timing.append(("copy", start, layer.event))
        else:
            began = time.perf_counter()
            for tensor, host in zip(layer.device_tensors(), layer.host):
                tensor.untyped_storage().resize_(host.numel() * host.element_size())
                tensor.copy_(host)
            self.stats.copy_s += time.perf_counter() - began
            self.stats.wait_s += time.perf_counter() - began
        layer.state = "copying"
        self.stats.copies += 1
        self.stats.bytes_copied += layer.nbytes
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self.in_flight()))

    def _event(self, stream) -> Optional[torch.cuda.Event]:
        if not self.measure:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def acquire(self, index: int) -> None:
        """Make a streamed layer usable by the kernels queued from now on (copy it if it is away)."""
        layer = self.layers.get(index)
        if layer is None or layer.state == "here":
            return
        self._start_copy(index)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            before = self._event(compute)
            compute.wait_event(layer.event)
            if self.measure:
                layer.timing.append(("wait", before, self._event(compute)))
            for tensor in layer.device_tensors():
                tensor.record_stream(compute)
        layer.state = "here"

    def release(self, index: int) -> None:
        """Free a streamed layer's device memory (its tensors stay, without storage)."""
        layer = self.layers.get(index)
        if layer is None or layer.state == "away":
            return
        for tensor in layer.device_tensors():
            tensor.untyped_storage().resize_(0)
        layer.state = "away"
        self.held.discard(index)

    def prefetch(self, order: Iterable[int]) -> None:
        """Start copying the streamed layers of `order`, in that order, while fewer than the limit are in flight."""
        for index in order:
            if index not in self.layers:
                continue
            if self.layers[index].state == "away":
                if len(self.in_flight()) >= self.limit:
                    return
                self._start_copy(index)

    def _evict(self, keep: int) -> None:
        """Free one layer that is in flight but not needed now (only when a schedule asks for more)."""
        for index in self.in_flight():
            if index != keep and index not in self.held:
                self.release(index)
                self.stats.evictions += 1
                return

    def after(self, index: int) -> list[int]:
        return [i for i in self.streamed if i > index]

    def before(self, index: int) -> list[int]:
        return [i for i in reversed(self.streamed) if i < index]

    # ---- the hooks ----------------------------------------------------------------------------
    def _pre_forward(self, index: int):
        def hook(module, args, kwargs):
            if self.driven:
                return None
            self.acquire(index)
            hidden = args[0] if args else kwargs.get("hidden_states")
            if index in self.held or getattr(hidden, "_qlora_stream_hooked", False):
                return None  # a recompute inside the backward (checkpointing that runs module hooks again)
            self.prefetch(self.after(index))
            if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(self._backward_reached(index))
                hidden._qlora_stream_hooked = True
            return None
        return hook

    def _post_forward(self, index: int):
        def hook(module, args, kwargs, output):
            if self.driven:
                return None
            training = torch.is_grad_enabled()
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if training and index == len(self.blocks) - 1 and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(self._backward_reached(len(self.blocks)))
            if index in self.held:
                return None
            if index in self.layers and not (training and index == self.streamed[-1]):
                self.release(index)
            if training and not self.after(index):
                self.prefetch(self.before(len(self.blocks)))  # the backward starts from the top
            else:
                self.prefetch(self.after(index))
            return None
        return hook

    def _backward_reached(self, boundary: int):
        """A hook for the gradient of layer `boundary`'s input: that layer's backward is done."""
        def hook(grad):
            if boundary in self.layers and boundary != self.streamed[0]:
                self.release(boundary)
            self.held.discard(boundary)
            below = boundary - 1
            if below in self.layers:
                self.acquire(below)
                self.held.add(below)
            upcoming = self.before(boundary - 1) if boundary > 0 else []
            self.prefetch(upcoming or self.streamed)  # at the bottom: the next forward starts
            return None
        return hook

    # ---- measuring and closing ----------------------------------------------------------------
    def collect(self) -> StreamStats:
        """Add the timed copies and waits (CUDA events; this synchronises) to the stats and return them."""
        if self.cuda and self.measure:
            torch.cuda.synchronize(self.device)
            for layer in self.layers.values():
                for kind, start, end in layer.timing:
                    seconds = start.elapsed_time(end) / 1000
                    if kind == "copy":
                        self.stats.copy_s += seconds
                    else:
                        self.stats.wait_s += seconds
                layer.timing.clear()
        return self.stats

    def reset_stats(self) -> None:
        self.collect()
        self.stats = StreamStats(max_in_flight=len(self.in_flight()))

    def close(self, materialise: bool = True) -> None:
        """Remove the hooks; with `materialise`, bring every streamed layer to the device for good."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if materialise:
            self.limit = len(self.layers) + 1
            for index in self.streamed:
                self.acquire(index)
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self.layers.clear()
            self.arena = PinnedArena(pin=self.cuda)  # the host copies' memory goes back


def materialised_layers(model: nn.Module) -> list[int]:
    """Decoder layers whose every 4-bit weight has its storage (measured, not the streamer's word)."""
    _, blocks = find_decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        weights = [m.weight for m in block.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if weights and any(storage_bytes(w) > 0 for w in weights):
            found.append(index)
    return found


def setup_streaming(model: nn.Module, resident_layers: int, layers_in_flight: int,
                    device: torch.device) -> Optional[LayerStreamer]:
    """Stream all but `resident_layers` decoder layers (-1: none stream); None when nothing streams.

    The memory plan supplies `resident_layers` and `layers_in_flight`.
    """
    _, blocks = find_decoder_blocks(model)
    streamed = streamed_layer_indices(len(blocks), resident_layers)
    if not streamed:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise UserError("--resident_layers streams layers on a single process only; run without accelerate launch")
    if device.type != "cuda":
        notice_once("no GPU: streamed layers are copied from host RAM to host RAM, which only exercises the mechanism")
    notice_once(f"streaming {len(streamed)} of {len(blocks)} decoder layers from host RAM, "
                f"at most {layers_in_flight} on the device at once")
    return LayerStreamer(model, streamed, device, layers_in_flight)
