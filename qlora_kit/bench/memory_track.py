"""Peak bytes of live tensors on the CPU: the host-side stand-in for `torch.cuda.max_memory_allocated()`.

CUDA keeps allocation statistics; the CPU allocator does not, and the process RSS mixes in the
Python heap, the libraries and glibc's arenas. `LiveTensorBytes` is a torch dispatch mode that
sees every tensor an operator returns while it is active, counts the bytes of each new storage
once, and subtracts them when the storage is freed (storages keep their Python object alive as
long as they live, so a finalizer on it fires exactly when the memory goes). Its `peak` is what
`max_memory_allocated` would report for the same work, less allocator rounding, counted from
zero when the mode is entered; tensors that existed before are not counted.
"""

from __future__ import annotations

import resource
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Count the bytes of tensor storages created while active; `peak` is their largest sum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0  # the largest single storage created
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def _track(self, tensor: torch.Tensor, input_pointers: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._tracked or storage.data_ptr() in input_pointers or tensor.device.type == "meta":
            return  # already counted, or a view / in-place result of an input
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, nbytes)
        weakref.finalize(storage, self._free, key, nbytes)

    def reset_peak(self) -> None:
        """Start a new peak (and largest storage) from the bytes alive now."""
        self.peak = self.live
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, _ = tree_flatten((args, kwargs))
        pointers = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, pointers)
        return out


def peak_rss_bytes() -> int:
    """This process's peak resident set: /proc's VmHWM on Linux.

    Not getrusage's ru_maxrss: Linux carries that high-water mark across fork and exec, so a child
    started from a big process (a test run) would report its parent's size.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
