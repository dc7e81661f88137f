"""Checkpoints: written atomically, read back for resume.

RUN/checkpoints/step-N/ holds the adapter (PEFT format), the optimizer state, the scheduler, the
RNG states and trainer_state.json (step, data position, counters). Tensors go to safetensors,
everything else to JSON: no pickle. A checkpoint is written into a temporary sibling folder,
fsynced, and renamed into place, so a folder named step-N is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from qlora_kit.errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where training stands: enough, with the RNG and optimizer, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    trained_tokens: int = 0


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume_dir(choice: str, run_dir: Path) -> Path:
    """'latest' -> the newest complete checkpoint of run_dir; otherwise the folder given."""
    if choice == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: {checkpoints_dir(run_dir)} holds no complete checkpoint")
        return found[-1]
    path = Path(choice).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {choice} is not a complete checkpoint folder (no {STATE_FILE})")
    return path


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    """Write checkpoints/step-N atomically and return its path."""
    final = checkpoints_dir(run_dir) / f"step-{state.step}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    save_optimizer(optimizer, tmp)
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    save_rng_state(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint; return its TrainState."""
    adapter = load_file(folder / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {folder} does not match this model's LoRA layers")
    load_optimizer(optimizer, folder)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    load_rng_state(folder)
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


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


def save_optimizer(optimizer, folder: Path) -> None:
    """Optimizer state (bitsandbytes' quantized state too): tensors to safetensors, the rest to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    structure = split_tensors(optimizer.state_dict(), tensors)
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


def save_rng_state(folder: Path) -> None:
    """Python, numpy, torch CPU and CUDA generator states."""
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = cuda_state
    save_file(tensors, folder / "rng.safetensors")
    python_state = random.getstate()
    (folder / "rng.json").write_text(json.dumps({
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }))


def load_rng_state(folder: Path) -> None:
    tensors = load_file(folder / "rng.safetensors")
    plain = json.loads((folder / "rng.json").read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
