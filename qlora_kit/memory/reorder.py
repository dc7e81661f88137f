"""Layer-major gradient accumulation: every micro-batch of an optimizer step through a layer before the next.

In the plain order (one micro-batch after another, each a full forward and backward) every
streamed layer crosses PCIe twice per micro-batch. `LayerMajorStep` runs one optimizer step as:

1. the stem of every micro-batch (embeddings, rotary tables, masks), recording the arguments each
   decoder layer is called with, and stopping before the first layer computes anything;
2. a forward without gradients, layer by layer: all micro-batches through layer i, then layer
   i+1. Each layer's input (a boundary activation) is kept in host RAM, pinned on a GPU;
3. the head of each micro-batch (final norm, lm_head, loss) on the top boundary, and its backward,
   which gives the gradient at the top boundary;
4. a backward layer by layer from the top: each micro-batch's input to layer i comes back from host
   RAM, the layer is recomputed with gradients (from the RNG state it had in step 2, so dropout
   draws the same masks) and back-propagated from the gradient above, giving the one below.

So every streamed layer is copied to the GPU once in step 2 and once in step 4 per optimizer step.
LoRA gradients accumulate across micro-batches as in the plain order; with dropout off, the losses
and the update equal the plain order's within float rounding (with dropout the masks are drawn in
another order, an equally valid draw). Host RAM for the boundaries: micro-batches x layers x tokens
x hidden size x 2 bytes in bf16, e.g. 10.7 GB for 4 x 2048 tokens of a 70B model (80 layers, hidden
8192), as the memory plan counts it.

No model-specific code: the driver swaps each decoder layer's `forward` for a recorder (step 1) or
a replay of the top boundary (step 3) while the model's own forward runs, through
qlora_kit/model/family.py's `replaced_forwards`. It needs decoder layers
that take the hidden state first (or as `hidden_states`) and return it, alone or first in a tuple,
as transformers' decoder LMs do; and no trainable parameters in the input embeddings.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.memory.pinned import PinnedArena
from qlora_kit.memory.stream import LayerStreamer
from qlora_kit.model.family import replaced_forwards
from qlora_kit.model.targets import find_decoder_blocks
from qlora_kit.train.loss import batch_loss_sum


class _StopForward(Exception):
    """Raised by the recorder in the last decoder layer: the stem's work is done."""


@dataclass
class _LayerCall:
    """The arguments a decoder layer was called with, besides the hidden state."""

    args: tuple
    kwargs: dict[str, Any]


class _HostStash:
    """Boundary activations in host RAM: pinned, and copied out on a side stream, on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.arena = PinnedArena(pin=True) if self.cuda else None

    def reset(self, expected_bytes: int) -> None:
        """The last step's boundaries are dead. Safe on a GPU: the next step's copies out wait on the
        compute stream, which ran the last step's copies back."""
        if self.cuda:
            self.arena.reset(expected_bytes)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.detach()
        host = self.arena.empty(tensor.shape, tensor.dtype)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            tensor.record_stream(self.stream)
        return host

    def get(self, host: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return host.detach()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return host.to(self.device, non_blocking=True)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerMajorStep:
    """One optimizer step's forward and backward in layer-major order; call it with the micro-batches."""

    def __init__(self, model: nn.Module, streamer: Optional[LayerStreamer], device: torch.device,
                 verify_recompute: bool = False):
        self.model = model
        self.streamer = streamer
        self.device = device
        self.verify_recompute = verify_recompute
        self.recompute_max_diff = 0.0  # with verify_recompute: the largest |recomputed - stored| boundary value
        _, self.blocks = find_decoder_blocks(model)
        self.tuple_output = False
        self.stash = _HostStash(device)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
            raise UserError("--layer_major_accumulation cannot train adapters on the input embeddings; "
                            "set it to false or leave the embeddings out of --lora_target_modules")

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], step_trained: int) -> torch.Tensor:
        """Forward and backward of all micro-batches; the LoRA gradients accumulate. Returns the summed token loss."""
        batches = [{k: v.to(self.device) for k, v in batch.items()} for batch in micro_batches]
        with self._driving():
            captured = [self._capture(batch) for batch in batches]
            hidden, calls = [h for h, _ in captured], [c for _, c in captured]
            del captured  # each boundary lives in one place only: `hidden`, then the host stash
            self.stash.reset(sum(h.numel() * h.element_size() for h in hidden) * len(self.blocks))
            stored, states = self._forward(hidden, calls)
            loss, grads = self._head(batches, hidden, step_trained)
            self._backward(calls, stored, grads, states)
        return loss

    # ---- the four stages --------------------------------------------------------------------
    def _capture(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[_LayerCall]]:
        """Run the stem; return the first layer's hidden state and every layer's other arguments."""
        calls: list[Optional[_LayerCall]] = [None] * len(self.blocks)
        first: list[torch.Tensor] = []

        def recorder(index: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                calls[index] = _LayerCall(tuple(args[1:]), kwargs)
                if index == 0:
                    first.append(hidden)
                if index == len(self.blocks) - 1:
                    raise _StopForward
                return (hidden,) if self.tuple_output else hidden
            return forward

        with replaced_forwards(self.blocks, recorder), torch.no_grad():
            try:
                batch_loss_sum(self.model, batch)
            except _StopForward:
                pass
        if not first or any(call is None for call in calls):
            raise UserError("layer-major accumulation could not follow this model's decoder layers; "
                            "set --layer_major_accumulation false")
        return first[0], calls

    def _forward(self, current: list[torch.Tensor], calls: list[list[_LayerCall]]):
        """All micro-batches through each layer in turn, without gradients; stash every layer's input.

        `current` holds each micro-batch's first-layer input and ends holding its top boundary.
        """
        count = len(self.blocks)
        stored: list[list[torch.Tensor]] = [[] for _ in current]
        states: list[list[Any]] = [[] for _ in current]
        for index, layer in enumerate(self.blocks):
            self._bring(index, upcoming=list(range(index + 1, count)) + list(range(count - 1, -1, -1)))
            with torch.no_grad():
                for g, hidden in enumerate(current):
                    stored[g].append(self.stash.put(hidden))
                    states[g].append(self._rng_state())
                    call = calls[g][index]
                    output = layer(hidden, *call.args, **call.kwargs)
                    self.tuple_output = isinstance(output, (tuple, list))
                    current[g] = _hidden(output)
            if index != count - 1:
                self._drop(index)
        return stored, states

    def _head(self, batches: list[dict], top: list[torch.Tensor], step_trained: int):
        """Final norm, lm_head and loss of each micro-batch from its top boundary (`top`, emptied), and their backward."""
        total = torch.zeros((), device=self.device)
        grads = []
        for g, batch in enumerate(batches):
            leaf = top[g].detach().requires_grad_(True)
            top[g] = None  # from here on its gradient stands in for it

            def replay(index: int, leaf=leaf):
                def forward(*args, **kwargs):
                    return (leaf,) if self.tuple_output else leaf
                return forward

            with replaced_forwards(self.blocks, replay):
                loss_sum = batch_loss_sum(self.model, batch)
            (loss_sum / max(step_trained, 1)).backward()
            grads.append(leaf.grad)
            total += loss_sum.detach()
        return total, grads

    def _backward(self, calls, stored, grads: list[torch.Tensor], states) -> None:
        """Recompute each layer with gradients, micro-batch by micro-batch, from the top down."""
        count = len(self.blocks)
        for index in range(count - 1, -1, -1):
            layer = self.blocks[index]
            self._bring(index, upcoming=list(range(index - 1, -1, -1)) + list(range(count)))
            for g in range(len(grads)):
                hidden = self.stash.get(stored[g][index]).requires_grad_(index > 0)
                self._set_rng_state(states[g][index])
                call = calls[g][index]
                with torch.enable_grad():
                    output = _hidden(layer(hidden, *call.args, **call.kwargs))
                if self.verify_recompute and index < count - 1:
                    expected = self.stash.get(stored[g][index + 1])
                    difference = float((output.detach().float() - expected.float()).abs().max())
                    self.recompute_max_diff = max(self.recompute_max_diff, difference)
                torch.autograd.backward(output, grads[g])
                grads[g] = hidden.grad if index > 0 else None
                if index + 1 < count:
                    stored[g][index + 1] = None  # the boundary above is no longer needed
            if self.streamer is None or index != self.streamer.streamed[0]:
                self._drop(index)  # the first streamed layer stays for the next step's forward

    # ---- helpers ----------------------------------------------------------------------------
    def _bring(self, index: int, upcoming: list[int]) -> None:
        if self.streamer is not None:
            self.streamer.acquire(index)
            self.streamer.prefetch(upcoming)

    def _drop(self, index: int) -> None:
        if self.streamer is not None:
            self.streamer.release(index)

    def _rng_state(self) -> tuple:
        cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda_state

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextmanager
    def _driving(self) -> Iterator[None]:
        """The streamer's hooks stand aside and the layers' own checkpointing is off while the driver runs."""
        saved = [getattr(layer, "gradient_checkpointing", None) for layer in self.blocks]
        for layer in self.blocks:
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = False  # the driver recomputes by itself
        if self.streamer is not None:
            self.streamer.driven = True
        try:
            yield
        finally:
            for layer, value in zip(self.blocks, saved):
                if value is not None:
                    layer.gradient_checkpointing = value
            if self.streamer is not None:
                self.streamer.driven = False


def layer_major_driver(model: nn.Module, streamer: Optional[LayerStreamer], enabled: bool,
                       accumulation_steps: int, num_processes: int, device: torch.device) -> Optional[LayerMajorStep]:
    """The layer-major step when layers stream and a step has several micro-batches; None otherwise."""
    if streamer is None or not enabled or accumulation_steps < 2:
        return None
    if num_processes > 1:
        notice_once("layer-major accumulation runs on one process only: using the plain micro-batch order")
        return None
    notice_once(f"layer-major accumulation: the {accumulation_steps} micro-batches of a step go through each "
                f"streamed layer together, so its weights are copied twice per optimizer step")
    return LayerMajorStep(model, streamer, device)
