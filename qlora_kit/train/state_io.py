"""Optimizer and RNG states to safetensors + JSON and back, without pickle.

`torch.save` would pickle these states; here every tensor goes to a safetensors file and the
structure around them (nesting, step counts, hyperparameters) to JSON. bitsandbytes' 8-bit state
(uint8 states, float32 absmax and quantization maps) round-trips bit for bit. Its paged
optimizers keep large states in paged (unified) CUDA memory; a plain load would put them in
ordinary device memory, so `load_optimizer` moves them back into paged buffers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting it in `tensors`."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_optimizer(optimizer, folder: Path, state_dict: Optional[dict[str, Any]] = None) -> None:
    """Optimizer state (bitsandbytes' quantized state too): tensors to safetensors, the rest to JSON.

    `state_dict`: the state to write instead of the optimizer's own (a sharded run's, gathered whole).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = split_tensors(optimizer.state_dict() if state_dict is None else state_dict, tensors)
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps(structure))


def load_optimizer(optimizer, folder: Path) -> None:
    structure = json.loads((folder / "optimizer.json").read_text())
    state_dict = join_tensors(structure, load_file(folder / "optimizer.safetensors"))
    state_dict["state"] = {int(k): v for k, v in state_dict["state"].items()}
    for group in state_dict["param_groups"]:  # JSON turned the betas tuple into a list
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict(state_dict)
    repage_optimizer_state(optimizer)


def repage_optimizer_state(optimizer) -> int:
    """Move a paged bitsandbytes optimizer's large states back into paged CUDA memory; return how many.

    bitsandbytes pages the states of CUDA parameters of at least 1e5 values (`get_state_buffer`);
    its `load_state_dict` restores them as ordinary device tensors, which can no longer be evicted
    to host RAM under memory pressure.
    """
    if not getattr(optimizer, "is_paged", False):
        return 0
    import bitsandbytes.functional as F

    moved = 0
    for parameter, state in optimizer.state.items():
        if not torch.is_tensor(parameter) or parameter.device.type != "cuda" or parameter.numel() < 1e5:
            continue
        for key in ("state1", "state2"):
            tensor = state.get(key)
            if tensor is None or getattr(tensor, "is_paged", False):
                continue
            paged = F.get_paged(*tensor.shape, dtype=tensor.dtype, device=tensor.device)
            paged.copy_(tensor)
            optimizer.page_mng.paged_tensors.append(paged)
            state[key] = paged
            moved += 1
    return moved


RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]  # tensors, and what JSON holds


def capture_rng_state() -> RngState:
    """This process's Python, numpy, torch CPU and CUDA generator states."""
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = cuda_state
    python_state = random.getstate()
    plain = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    stem = "rng" if rank == 0 else f"rng-{rank}"  # process 0 (or the only one) in rng.*
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def save_rng_state(folder: Path, states: list[RngState] | None = None) -> None:
    """The generator states of every process (`states`, by rank), or of this one; rng[-RANK].safetensors + .json."""
    for rank, (tensors, plain) in enumerate(states or [capture_rng_state()]):
        tensor_file, json_file = _rng_files(folder, rank)
        save_file(tensors, tensor_file)
        json_file.write_text(json.dumps(plain))


def load_rng_state(folder: Path, rank: int = 0) -> None:
    """Restore the generator states process `rank` saved."""
    tensor_file, json_file = _rng_files(folder, rank)
    tensors = load_file(tensor_file)
    plain = json.loads(json_file.read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
