"""The non-finite guard: a step whose loss, gradient norm, learning rate or update is NaN or inf is skipped.

The guard decides on the device, so it adds no device-to-host synchronisation: a 0-dim boolean
`apply` is computed from the step's loss and gradient norm, and the update is undone where it is
false, without the host ever reading it. Counters (skipped steps, bad steps in a row, where the
run of bad steps began) live on the device too and are read only where the loop reads values
anyway: at logging steps and checkpoints.

How a step is undone depends on the optimizer:
- bitsandbytes' optimizers update one parameter at a time through `update_step`; the guard wraps
  that method, copies the parameter and its state before the update and puts them back with
  `torch.where(apply, new, old)` after it, so at most one parameter's state is copied at a time.
  Paged states are CPU-typed tensors over CUDA managed memory; the guard works on a CUDA view.
  bitsandbytes counts steps in a Python int per parameter, which the device cannot undo; the
  guard subtracts the skipped steps when it reads its counters. Until then (at most
  `logging_steps - 1` steps) Adam's bias correction runs one step ahead per skipped step.
  The new values are kept only where they are finite too: a parameter whose update came out
  NaN or inf (finite gradients can still give one, e.g. through a huge learning rate) keeps its
  old values and state, and the step counts as a bad step. The other parameters of that step
  keep their update: the check is per parameter, so no second copy of every state is needed.
- torch's fused AdamW takes a `found_inf` flag (the GradScaler protocol) and skips on the device,
  step counts included. It updates all parameters in one call, so a non-finite update cannot be
  undone without a copy of every parameter and state: after the step the guard checks them on
  the device and, if any is not finite, trips at once. The loop then stops at its next check
  without saving the broken weights (train/loop.py refuses to write a non-finite adapter).

After `max_in_a_row` bad steps in a row the guard trips: every later step is skipped too, so the
weights stay those from before the trouble until the loop sees it and stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from qlora_kit.errors import UserError

QUANTIZATION_MAPS = ("qmap1", "qmap2")  # bitsandbytes' constant code books, shared between parameters


class _CudaArray:
    """A CUDA array interface over a raw device pointer, for `torch.as_tensor`."""

    def __init__(self, tensor: torch.Tensor):
        self.__cuda_array_interface__ = {
            "shape": tuple(tensor.shape), "typestr": torch.empty(0, dtype=tensor.dtype).numpy().dtype.str,
            "data": (tensor.data_ptr(), False), "version": 2, "strides": None,
        }


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA view of a bitsandbytes paged buffer (a CPU tensor over CUDA managed memory); other tensors as they are.

    Through the view, the guard's copies and `torch.where` run on the GPU, where the update ran,
    instead of pulling the pages to the host.
    """
    if not getattr(tensor, "is_paged", False):
        return tensor
    view = torch.as_tensor(_CudaArray(tensor))
    if view.device.type != "cuda" or view.data_ptr() != tensor.data_ptr():
        raise RuntimeError("could not view a paged optimizer state on the GPU without copying it")
    return view


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's share of a tensor sharded by FSDP, else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device boolean: every value of every floating-point tensor is finite (no host synchronisation).

    Of a tensor sharded by FSDP only this process's share is looked at (`every_process` combines them).
    """
    floats = [_local(t).detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    return torch.stack([torch.isfinite(t).all().to(floats[0].device) for t in floats]).all()


def every_process(flag: torch.Tensor) -> torch.Tensor:
    """A device boolean true only where it is true on every process of the run."""
    value = flag.to(torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value.bool()


@dataclass
class GuardReport:
    """The guard's counters, as read by the host."""

    skipped: int  # steps skipped since training began
    newly_skipped: int  # since the previous read
    in_a_row: int  # bad steps at the end of the steps so far
    trouble_start: int  # the first step of the latest run of bad steps (0: none yet)
    tripped: bool


class NonfiniteGuard:
    """Skips optimizer steps with a non-finite loss or gradient norm, deciding on the device."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_in_a_row: int, device: torch.device):
        self.optimizer = optimizer
        self.max_in_a_row = max_in_a_row
        self.enabled = max_in_a_row > 0
        self.apply = torch.ones((), dtype=torch.bool, device=device)
        self.update_finite = torch.ones((), dtype=torch.bool, device=device)  # this step's new values so far
        # skipped, in a row, trouble start, tripped
        self.counts = torch.zeros(4, dtype=torch.long, device=device)
        self._read_skipped = 0
        self._python_step_counts = False
        self.last = GuardReport(0, 0, 0, 0, False)  # as of the latest read()
        # FSDP's parameters (DTensors): each process sees only its share of an update
        self.sharded = any(hasattr(p, "to_local") for group in optimizer.param_groups for p in group["params"])
        if self.enabled:
            self._attach(optimizer)

    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        if hasattr(optimizer, "update_step") and hasattr(optimizer, "non_castable_tensor_keys"):  # bitsandbytes
            self._wrap_update_step(optimizer)
            self._python_step_counts = True
        elif all(group.get("fused") for group in optimizer.param_groups):
            optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=self.apply.device)
        else:
            raise ValueError(f"the non-finite guard cannot skip steps of {type(optimizer).__name__} on the device")

    def _wrap_update_step(self, optimizer) -> None:
        original = optimizer.update_step

        def guarded_update_step(group, p, gindex, pindex):
            state = optimizer.state[p]
            keys = [k for k, v in state.items() if torch.is_tensor(v) and k not in QUANTIZATION_MAPS]
            saved = [p.detach().clone()] + [on_device(state[k]).clone() for k in keys]
            original(group, p, gindex, pindex)
            new = [p.data] + [on_device(state[k]) for k in keys]
            keep = self.apply & all_finite(new)
            self.update_finite &= keep | ~self.apply  # a skipped step's update is not judged
            for tensor, old in zip(new, saved):
                torch.where(keep, tensor, old, out=tensor)

        optimizer.update_step = guarded_update_step

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, learning_rates: Sequence[float] = ()) -> torch.Tensor:
        """Decide (on the device) whether this step's update is applied; call before optimizer.step().

        Args:
            loss: the step's summed loss (a device scalar).
            grad_norm: the gradient norm before clipping (a device scalar).
            learning_rates: the step's learning rate per parameter group (host floats); a non-finite one skips the step.
        """
        if not self.enabled:
            return self.apply
        tripped = self.counts[3] > 0
        self.update_finite.fill_(True)
        finite_rates = all(map(math.isfinite, learning_rates))
        self.apply.copy_(torch.isfinite(loss) & torch.isfinite(grad_norm) & ~tripped & finite_rates)
        found_inf = getattr(self.optimizer, "found_inf", None)
        if found_inf is not None:
            found_inf.copy_(~self.apply)
        return self.apply

    def after_step(self, step: int) -> None:
        """Update the counters for optimizer step `step` (1-based), on the device."""
        if not self.enabled:
            return
        if not self._python_step_counts:  # torch's AdamW: judge the applied update now (it cannot be undone)
            finite = all_finite(self._optimizer_tensors())
            if self.sharded:  # every process judges the whole update
                finite = every_process(finite.to(self.apply.device))
            self.update_finite.copy_(finite | ~self.apply)
        bad = (~(self.apply & self.update_finite)).long()
        skipped, in_a_row, start, tripped = self.counts.unbind()
        in_a_row = (in_a_row + 1) * bad
        start = torch.where((bad > 0) & (in_a_row == 1), step, start)
        unrecoverable = (~self.update_finite).long() * int(not self._python_step_counts)
        tripped = torch.maximum(tripped, torch.maximum((in_a_row >= self.max_in_a_row).long(), unrecoverable))
        self.counts.copy_(torch.stack([skipped + bad, in_a_row, start, tripped]))
        self.apply &= self.update_finite  # what the loop counts as applied

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        """Every parameter and floating-point state tensor of the optimizer."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point() and v.dim()]
        return tensors

    def read(self) -> GuardReport:
        """Read the counters (one device-to-host copy) and set bitsandbytes' step counts back."""
        skipped, in_a_row, start, tripped = self.counts.tolist()
        newly = skipped - self._read_skipped
        self._read_skipped = skipped
        if newly and self._python_step_counts:
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), int):
                    state["step"] -= newly
        self.last = GuardReport(skipped, newly, in_a_row, start, bool(tripped))
        return self.last

    @property
    def tripped(self) -> bool:
        """Whether the latest read() found the guard tripped."""
        return self.last.tripped

    def state_dict(self) -> dict[str, Any]:
        """The counters for a checkpoint; call `read()` first so bitsandbytes' step counts are set back."""
        skipped, in_a_row, start, tripped = self.counts.tolist()
        return {"skipped": skipped, "in_a_row": in_a_row, "trouble_start": start, "tripped": bool(tripped)}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Restore the counters; a tripped guard starts afresh (the user resumes after fixing the cause)."""
        if not values:
            return
        tripped = bool(values["tripped"])
        in_a_row = 0 if tripped else values["in_a_row"]
        start = 0 if tripped else values["trouble_start"]
        self.counts.copy_(torch.tensor([values["skipped"], in_a_row, start, 0], dtype=torch.long))
        self._read_skipped = values["skipped"]


def nonfinite_stop_message(report: GuardReport, max_in_a_row: int, step: int, checkpoint: str) -> str:
    """What happened, where the weights stand, and the usual causes."""
    after = report.in_a_row - max_in_a_row
    held = f" (and the {after} after them, held back until this check)" if after > 0 else ""
    return (
        f"training stopped at step {step}: {max_in_a_row} optimizer steps in a row from step "
        f"{report.trouble_start} on had a non-finite loss or gradient norm; they{held} were skipped, so "
        f"the weights are those of step {report.trouble_start - 1}, saved in {checkpoint}. Usual causes: a "
        f"learning rate too high (lower --learning_rate), float16 overflow (use --bnb_4bit_compute_dtype "
        f"bfloat16 or float32), or bad data in those steps' batches. After the fix, continue with "
        f"--resume_from_checkpoint latest"
    )


def nonfinite_parameters(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or inf (one device-to-host read)."""
    named = list(tensors.items())
    if not named:
        return []
    finite = torch.stack([all_finite([p]).to(named[0][1].device) for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def refuse_nonfinite_weights(adapter: Mapping[str, torch.Tensor], what: str, newest_checkpoint: Optional[Path]) -> None:
    """Raise before a non-finite adapter is written: neither a checkpoint nor the final adapter may hold NaN or inf.

    Args:
        adapter: the trainable parameters by name (`qlora_kit.model.shard.trainable_tensors`).
        what: the start of the message, e.g. "training stopped at step 7".
        newest_checkpoint: the newest checkpoint written (None: none), named as the way back.

    Raises:
        UserError: naming what stopped, a parameter, and what there is to go back to.
    """
    bad = nonfinite_parameters(adapter)
    if not bad:
        return
    back = (f"the newest checkpoint, {newest_checkpoint}, is intact: after the fix continue with "
            f"--resume_from_checkpoint latest" if newest_checkpoint else
            "no checkpoint was written before it: after the fix start over with --overwrite_output_dir true")
    raise UserError(
        f"{what}: {len(bad)} LoRA weight tensor(s) hold NaN or inf (e.g. {bad[0]}) and are never saved; {back}. "
        f"Usual causes: a learning rate too high (lower --learning_rate), float16 overflow (use "
        f"--bnb_4bit_compute_dtype bfloat16 or float32), or --max_nonfinite_steps 0, which applies non-finite updates"
    )
