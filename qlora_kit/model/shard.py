"""FSDP2-sharded QLoRA: each process loads the model one decoder layer at a time and keeps its share.

Under an FSDP launch (qlora_kit/launch.py) the NF4 base, the LoRA weights, their gradients and the
optimizer states are split across the processes with torch's FSDP2 (`fully_shard`, one unit per
decoder layer and one for the rest). For FSDP to split and gather the packed 4-bit weights like any
other weight, bitsandbytes stores them in the compute dtype (`bnb_4bit_quant_storage`); their
quantization states stay whole on every process (they hang on the modules, not in parameters).

qlora_kit calls `fully_shard` itself rather than through accelerate's FSDP plugin (accelerate 1.16),
for two reasons measured here:
- for a model with bitsandbytes 4-bit weights, the plugin's `fsdp2_prepare_model` skips its
  RAM-efficient loading, so every process must hold the whole 4-bit model on its GPU before the
  plugin splits it: ~37 GB for a 70B model, more than a 24 GB card;
- accelerate runs FSDP on GPUs only (on a CPU the same launch becomes plain data parallel), so the
  plugin's path could not be tested on the machines the test suite runs on.
`load_sharded` builds the model on the meta device, adds the LoRA adapters, then for each decoder
layer reads that layer's tensors from the checkpoint (qlora_kit.io.safetensors, one tensor at a
time), quantizes them on this process's device and shards the layer at once, so a process never
holds more than its shares plus one whole layer, in host RAM or on the GPU. The settings are the
launch's (`fsdp_reshard_after_forward`, `fsdp_offload_params`); the accelerator is then given only
the optimizer (with an FSDP launch on a GPU it would hand back an already-sharded model unchanged).

The other functions are what the training loop needs of a sharded model: every process gathers the
full LoRA weights and optimizer states before one of them writes (checkpoints and the adapter have
the single-GPU format), and a checkpoint read back is split again.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import bitsandbytes as bnb
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig

from qlora_kit.config import RunConfig
from qlora_kit.errors import UserError
from qlora_kit.io.safetensors import read_header, read_tensors
from qlora_kit.launch import LaunchSettings
from qlora_kit.log import logger, notice_once
from qlora_kit.memory.plan import FSDP_OPTIM
from qlora_kit.model.bnb_cpu import four_bit_layers
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing
from qlora_kit.model.stream_load import Placement, TensorPlacer, build_empty_model, checkpoint_shards
from qlora_kit.model.targets import find_decoder_blocks

def refuse_unshardable(config: RunConfig, launch: LaunchSettings) -> None:
    """Refuse, before anything loads, the settings an FSDP launch cannot run, each with what to do instead."""
    fsdp = "with an FSDP launch (recipes/accelerate/fsdp2.yaml)"
    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        raise UserError(f"torch {torch.__version__} has no public FSDP2 (`torch.distributed.fsdp.fully_shard`), which "
                        f"qlora_kit shards with: install torch 2.6 or newer to run {fsdp}")
    if config.train.optim != FSDP_OPTIM:
        raise UserError(f"--optim {config.train.optim} does not run {fsdp}: bitsandbytes' optimizers cannot update "
                        f"sharded parameters; pass --optim {FSDP_OPTIM} (its states are sharded too)")
    if config.lora.use_dora:
        raise UserError(f"--use_dora does not run {fsdp}: DoRA's magnitudes are computed from the whole base "
                        f"weights at setup, which no process holds; train without it, or with data parallel")
    if config.stream.resident_layers >= 0 or config.stream.quantized_cache:
        raise UserError(f"--resident_layers and --quantized_cache do not run {fsdp}: FSDP already splits the "
                        f"layers across the {launch.num_processes} processes (fsdp_offload_params: true in the "
                        f"accelerate configuration keeps the shares in host RAM); drop them")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def load_sharded(model_dir: Path, config: RunConfig, compute_dtype: torch.dtype, lora_dtype: torch.dtype,
                 device: torch.device, launch: LaunchSettings) -> PeftModel:
    """The NF4 model with its LoRA adapters, sharded across the launch's processes as it loads.

    Every process reads the checkpoint itself, keeping its share of each decoder layer. The LoRA
    weights are drawn as on one process (same seed, same values), so a sharded run starts where an
    unsharded one does.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
    base = build_empty_model(hf_config, config.model, compute_dtype, quant_storage=compute_dtype)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    blocks_path, blocks = find_decoder_blocks(base)
    placer = TensorPlacer(base, Placement(device, blocks_path), compute_dtype)
    model = add_lora_to_empty_model(base, config, lora_dtype)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    shard = _sharder(device, launch)
    files = checkpoint_files_by_layer(checkpoint_shards(model_dir), placer)
    for index, block in enumerate(blocks):
        for key, value in read_keys(files.pop(index, {})):
            placer.put(key, value)
        move_trainable(block, device)
        shard(block)
    for key, value in read_keys(files.pop(None, {})):
        placer.put(key, value)
    placer.finish()  # ties weights, refuses what is missing, freezes the whole model: the adapters thaw again
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    move_trainable(model, device)
    shard(model, root=True)
    register_fsdp_forward_method(model, "generate")  # sample replies: the root gathers its weights for it
    held, whole = parameter_bytes(model)
    processes = f"{launch.num_processes} process" + ("es" if launch.num_processes != 1 else "")
    logger.info(f"FSDP2 over {processes}: each holds its share of the parameters, "
                f"{held / 2**20:,.1f} MiB of {whole / 2**20:,.1f} MiB here (the NF4 quantization states stay whole)")
    return model


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the parameters this process holds, and of all of them."""
    held = whole = 0
    for parameter in model.parameters():
        whole += parameter.numel() * parameter.element_size()
        local = parameter.to_local() if _is_dtensor(parameter) else parameter
        held += local.numel() * local.element_size()
    return held, whole


def add_lora_to_empty_model(base: nn.Module, config: RunConfig, lora_dtype: torch.dtype) -> PeftModel:
    """`add_lora` on a model whose weights are on the meta device, the adapters real in host RAM.

    peft moves each new adapter to the device of its base layer, which would turn the values it just
    drew into meta tensors. For the call, every 4-bit weight is an empty host tensor (its quantization
    settings kept), so the adapters stay in host RAM with the values `add_lora` draws on a loaded model.
    """
    layers = four_bit_layers(base)
    meta_weights = [layer.weight for layer in layers]
    for layer, weight in zip(layers, meta_weights):
        layer._parameters["weight"] = bnb.nn.Params4bit(torch.empty(0, dtype=torch.uint8), requires_grad=False,
                                                        **weight.__dict__)
    try:
        model = add_lora(base, config.lora, lora_dtype)
    finally:
        for layer, weight in zip(layers, meta_weights):
            layer._parameters["weight"] = weight
    on_meta = [name for name, p in model.named_parameters() if p.requires_grad and p.device.type == "meta"]
    if on_meta:
        raise UserError(f"LoRA on {on_meta[0]} targets a module that is not a 4-bit projection, which a sharded "
                        f"run cannot set up; name the projections with --lora_target_modules")
    return model


def _sharder(device: torch.device, launch: LaunchSettings):
    """`fully_shard` over all the processes with the launch's settings."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (launch.num_processes,))
    offload_params = launch.offload_params
    if offload_params and device.type == "cpu":
        notice_once("fsdp_offload_params is for GPUs (torch's CPU offload needs one): without a GPU the shares "
                    "are in host RAM anyway, so they stay where they are")
        offload_params = False
    offload = CPUOffloadPolicy() if offload_params else OffloadPolicy()

    def shard(module: nn.Module, root: bool = False) -> None:
        # The root (embeddings, final norm, lm_head) stays gathered from its forward to its backward, as
        # torch's default for a root does: the loss uses lm_head after the forward (train/loss.py).
        fully_shard(module, mesh=mesh, reshard_after_forward=False if root else launch.reshard_after_forward,
                    offload_policy=offload)

    return shard


def checkpoint_files_by_layer(files: list[Path], placer: TensorPlacer) -> dict[Optional[int], dict[Path, set[str]]]:
    """The checkpoint's tensor names grouped by decoder layer (None: the rest), each group by file."""
    groups: dict[Optional[int], dict[Path, set[str]]] = defaultdict(lambda: defaultdict(set))
    for file in files:
        for key in read_header(file).entries:
            name = placer.resolve(key)
            groups[placer.placement.layer_of(name) if name else None][file].add(key)
    return groups


def read_keys(group: Mapping[Path, set[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one group, one at a time."""
    for file, keys in group.items():
        yield from read_tensors(file, keys)


def move_trainable(module: nn.Module, device: torch.device) -> None:
    """Move the trainable (LoRA) parameters under `module` that are not yet sharded to `device`."""
    for parameter in module.parameters():
        if parameter.requires_grad and not _is_dtensor(parameter) and parameter.device != device:
            parameter.data = parameter.data.to(device)


# ---------------------------------------------------------------- gathering and splitting


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(obj: Any) -> Any:
    """`obj` (a tensor, or dicts and lists of them) with every sharded tensor gathered whole, on the host.

    Every process must call it with the same structure: each gather is a collective.
    """
    if _is_dtensor(obj):
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, dict):
        return {key: full_tensors(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(value) for value in obj)
    return obj


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: gathered whole on every process when sharded, else the parameters."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return full_tensors(named) if is_sharded(model) else named


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's state dict, its sharded states gathered whole when `model` is sharded."""
    state = optimizer.state_dict()
    return full_tensors(state) if is_sharded(model) else state


def saved_names(model: PeftModel) -> dict[str, str]:
    """The adapter file's tensor names (peft drops the adapter's name from them) to the model's parameter names."""
    adapter = f".{model.active_adapter}"
    return {name.replace(adapter, ""): name for name, p in model.named_parameters() if p.requires_grad}


def split_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's share of a whole tensor, placed as the sharded `like` (every process holds `full`).

    `distribute_tensor` puts the share on the mesh's device; a share FSDP offloads goes back to host RAM.
    """
    from torch.distributed.tensor import distribute_tensor

    share = distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return share if share.device == like.device else share.to(like.device)


def load_trainable(model: nn.Module, named: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors into the trainable parameters of the same names, each process its share."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in named.items():
            target = parameters[name]
            target.copy_(split_like(value, target) if _is_dtensor(target) else value.to(target.device, target.dtype))


def split_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole optimizer states into an optimizer of sharded parameters, keep each one's share."""
    for parameter, state in optimizer.state.items():
        if not _is_dtensor(parameter):
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and not _is_dtensor(value) and tuple(value.shape) == tuple(parameter.shape):
                state[key] = split_like(value, parameter)
