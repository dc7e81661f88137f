"""The recipe's use of the memory plan: make it before loading, check the user's settings, apply it.

`plan_for_run` plans for the card (--gpu_memory auto reads it; a size plans for that size; none
skips) from the model's config.json, prints the budget table, and
- returns the plan when it fits;
- when it does not fit only because of a memory setting the user chose (--offload_activations,
  --loss_chunk_size), warns with the plan that would fit and keeps the user's choice;
- otherwise refuses the run with the planner's explanation of what is missing (a `UserError`,
  before anything is loaded or written).
When the layers do not all fit, the plan streams the rest from host RAM (qlora_kit/memory/stream.py);
`--resident_layers N` fixes how many stay on the GPU instead. `stream_arguments` hands the plan's
choice to the loader; `apply_memory_settings` then sets the loss chunk size and turns activation
offload on, from the plan or, without one, from the user's explicit settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional

import psutil
import torch
from torch import nn

from qlora_kit.config import RunConfig, StreamArguments
from qlora_kit.errors import UserError
from qlora_kit.launch import LaunchSettings, launch_settings
from qlora_kit.log import logger, notice_once
from qlora_kit.memory.budget import PlanSettings
from qlora_kit.memory.offload import ActivationOffloader, enable_activation_offload
from qlora_kit.memory.plan import MemoryPlan, describe_launch, format_table, gib, parse_memory_size, plan_memory
from qlora_kit.memory.shapes import load_model_config, meta_model, shape_from_model
from qlora_kit.train.loss import set_loss_chunk_size


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def planned_launch(config: RunConfig) -> LaunchSettings:
    """The processes to plan for: the launch's (accelerate's environment), unless --plan_num_processes or
    --plan_fsdp say otherwise (to plan several GPUs before launching)."""
    memory = config.memory
    launch = launch_settings() if memory.plan_num_processes == 0 or memory.plan_fsdp == "auto" else LaunchSettings()
    num_processes = memory.plan_num_processes or launch.num_processes
    if memory.plan_fsdp == "auto":
        return dataclasses.replace(launch, num_processes=num_processes)
    return LaunchSettings(num_processes=num_processes, fsdp=memory.plan_fsdp != "false",
                          offload_params=memory.plan_fsdp == "offload")


def plan_settings(config: RunConfig, compute_dtype: str, lora_dtype: str) -> PlanSettings:
    """The planner's view of a run configuration, for the launch's processes (`planned_launch`)."""
    launch = planned_launch(config)
    return PlanSettings(
        micro_batch_size=config.train.per_device_train_batch_size,
        max_seq_length=config.data.max_seq_length,
        lora_r=config.lora.lora_r,
        lora_target_modules=config.lora.lora_target_modules,
        lora_dropout=config.lora.lora_dropout,
        use_dora=config.lora.use_dora,
        optim=config.train.optim,
        compute_dtype=compute_dtype,
        lora_dtype=lora_dtype,
        double_quant=config.model.bnb_4bit_use_double_quant,
        gradient_checkpointing=config.train.gradient_checkpointing,
        attn_implementation=config.model.attn_implementation,
        offload_activations=config.memory.offload_activations,
        loss_chunk_size=config.memory.loss_chunk_size,
        resident_layers=config.stream.resident_layers if config.stream.resident_layers >= 0 else None,
        layer_major_micro_batches=config.train.gradient_accumulation_steps if config.stream.layer_major_accumulation else 1,
        num_processes=launch.num_processes,
        fsdp=launch.fsdp,
        fsdp_offload_params=launch.offload_params,
    )


def gpu_memory_bytes(choice: str, device: torch.device) -> Optional[int]:
    """The GPU memory to plan for, or None when there is no plan to make."""
    if choice == "none":
        return None
    if choice != "auto":
        return parse_memory_size(choice, "--gpu_memory")
    if device.type != "cuda":
        notice_once("no GPU: no memory plan (--gpu_memory auto reads the card; give a size to plan for one)")
        return None
    return torch.cuda.get_device_properties(device).total_memory


def _user_choices(config: RunConfig) -> list[str]:
    chosen = []
    if config.memory.offload_activations is not None:
        chosen.append(f"--offload_activations {str(config.memory.offload_activations).lower()}")
    if config.memory.loss_chunk_size is not None:
        chosen.append(f"--loss_chunk_size {config.memory.loss_chunk_size}")
    if config.stream.resident_layers >= 0:
        chosen.append(f"--resident_layers {config.stream.resident_layers}")
    return chosen


def plan_for_config(config: RunConfig, compute_dtype: str, lora_dtype: str, gpu: int, host: int,
                    free_choices: bool = False) -> MemoryPlan:
    """Plan a parsed run configuration for `gpu` bytes of GPU memory and `host` bytes of host RAM.

    Args:
        free_choices: let the planner choose offload, chunk size and resident layers even where the user set them.
    """
    model_config = load_model_config(config.model.model_name_or_path, config.model.trust_remote_code)
    shape = shape_from_model(meta_model(model_config, config.model.trust_remote_code), model_config)
    settings = plan_settings(config, compute_dtype, lora_dtype)
    if free_choices:
        settings = dataclasses.replace(settings, offload_activations=None, loss_chunk_size=None, resident_layers=None)
    return plan_memory(shape, settings, gpu, host, getattr(model_config, "max_position_embeddings", None))


def plan_for_run(config: RunConfig, model_dir: Path, device: torch.device, compute_dtype: torch.dtype,
                 lora_dtype: torch.dtype) -> Optional[MemoryPlan]:
    """Plan the run for the card from config.json alone; refuse it when nothing can fit."""
    gpu = gpu_memory_bytes(config.memory.gpu_memory, device)
    if gpu is None:
        return None
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, model_name_or_path=str(model_dir)))
    host = psutil.virtual_memory().total
    dtypes = dtype_name(compute_dtype), dtype_name(lora_dtype)
    plan = plan_for_config(config, *dtypes, gpu, host)
    logger.info(format_table(plan, f"memory plan for {gib(gpu)} of GPU memory and {gib(host)} of host RAM:"))
    if plan.fits:
        return plan
    chosen = _user_choices(config)
    if chosen:
        free = plan_for_config(config, *dtypes, gpu, host, free_choices=True)
        if free.fits:
            logger.warning(f"warning: with {' '.join(chosen)}, {plan.explanation}; without them the plan fits "
                           f"with offload_activations={str(free.offload_activations).lower()}, "
                           f"loss_chunk_size={free.loss_chunk_size}, resident_layers={free.resident_layers}. "
                           f"Keeping your settings.")
            return plan
    raise UserError(f"{plan.explanation} (the memory plan above has every row)")


def stream_arguments(stream: StreamArguments, plan: Optional[MemoryPlan]) -> StreamArguments:
    """The streaming settings to load with: the user's --resident_layers, else the plan's when it streams."""
    if stream.resident_layers >= 0 or plan is None or not plan.streamed_layers:
        return stream
    logger.info(f"streaming {plan.streamed_layers} decoder layers from host RAM, as planned")
    return dataclasses.replace(stream, resident_layers=plan.resident_layers, layers_in_flight=plan.layers_in_flight)


def refuse_streaming_across_processes(stream: StreamArguments, model_dir: Path, num_processes: int,
                                     trust_remote_code: bool = False) -> None:
    """Refuse, before anything loads, a run of several processes whose decoder layers would stream: layer
    streaming runs on one process only (memory/stream.py)."""
    if num_processes == 1 or stream.resident_layers < 0:
        return
    layers = load_model_config(str(model_dir), trust_remote_code).get_text_config().num_hidden_layers
    if stream.resident_layers >= layers:
        return
    raise UserError(f"{layers - stream.resident_layers} of {layers} decoder layers would stream from host RAM "
                    f"(--resident_layers {stream.resident_layers}, or the memory plan when the model does not fit the "
                    f"card), and layer streaming runs on one process only: train on one process, or on {num_processes} "
                    f"GPUs that each hold the whole model")


def apply_memory_settings(model: nn.Module, config: RunConfig, plan: Optional[MemoryPlan],
                          device: torch.device) -> Optional[ActivationOffloader]:
    """Set the loss chunk size and activation offload from the plan (or the user's explicit settings)."""
    chunk = plan.loss_chunk_size if plan is not None else config.memory.loss_chunk_size
    if chunk is not None:
        set_loss_chunk_size(model, chunk)
    offload = plan.offload_activations if plan is not None else bool(config.memory.offload_activations)
    if not offload:
        return None
    if not config.train.gradient_checkpointing:
        raise UserError("--offload_activations true needs --gradient_checkpointing true (it offloads the checkpoints)")
    if device.type != "cuda":
        notice_once("activation offload: no GPU, so the checkpoints already live in host memory (same code path, no copies)")
    return enable_activation_offload(model, device, _layer_inputs_bytes(plan))


def _layer_inputs_bytes(plan: Optional[MemoryPlan]) -> int:
    """The checkpointed layer inputs of one micro-batch of this process, as the plan counts them (0 without a
    plan); the plan's host rows count every process of the machine."""
    if plan is None:
        return 0
    return sum(row.bytes for row in plan.rows if row.name == "checkpointed hidden states") // plan.num_processes


def _planned_dtypes(config: RunConfig) -> tuple[str, str]:
    """Compute and LoRA dtypes for planning: 'auto' means bfloat16, as on the GPUs the plan is for."""
    compute = "bfloat16" if config.model.bnb_4bit_compute_dtype == "auto" else config.model.bnb_4bit_compute_dtype
    if config.lora.lora_dtype != "auto":
        return compute, config.lora.lora_dtype
    return compute, "bfloat16" if compute == "bfloat16" else "float32"


def plan_command(argv: list[str]) -> int:
    """tools/plan_memory.py: print the budget table and plan (or JSON); exit 0 if it fits, 1 if not."""
    from qlora_kit.config import parse

    own = argparse.ArgumentParser(prog="python tools/plan_memory.py", add_help=False)
    own.add_argument("--model", default=None)
    own.add_argument("--json", action="store_true")
    own.add_argument("--host_memory", default=None)
    own.add_argument("-h", "--help", action="store_true")
    args, rest = own.parse_known_args(argv)
    if args.help:
        print(PLAN_USAGE)
        return 0
    if args.model is None:
        raise UserError("--model is required: a config.json, a model folder, a hub id or a shipped shape name")
    config = parse(rest + ["--model_name_or_path", args.model])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = gpu_memory_bytes(config.memory.gpu_memory, device)
    if gpu is None:
        raise UserError("give --gpu_memory SIZE (such as 24GiB): there is no GPU here to read")
    host = parse_memory_size(args.host_memory, "--host_memory") if args.host_memory else psutil.virtual_memory().total
    compute, lora = _planned_dtypes(config)
    plan = plan_for_config(config, compute, lora, gpu, host)
    if args.json:
        print(json.dumps({"model": args.model, **plan.to_dict()}, indent=2))
    else:
        print(format_table(plan, f"{args.model}: {compute} compute, r={config.lora.lora_r}, {config.train.optim}, "
                                 f"{gib(gpu)} of GPU memory{' per GPU' if describe_launch(plan) else ''}, "
                                 f"{gib(host)} of host RAM"))
    return 0 if plan.fits else 1


PLAN_USAGE = """usage: python tools/plan_memory.py --model PATH|HUB_ID|config.json|NAME --gpu_memory 24GiB [run fields] [--json]
                                   [--host_memory 64GiB]

The budget table and the memory plan of a QLoRA run, from the model's config.json alone (no weights).
NAME is a shipped shape in recipes/models/ (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, qwen2.5-72b,
mistral-7b, gemma-2-9b, smollm2-135m-instruct). Run fields are the recipe's (see
python -m qlora_kit.recipes.chat --help): --per_device_train_batch_size, --max_seq_length, --lora_r,
--optim, --offload_activations, --loss_chunk_size, --config YAML, ... --host_memory defaults to this
machine's RAM. Several GPUs: --plan_num_processes N (default: the launch's WORLD_SIZE, else 1) and
--plan_fsdp true|offload|false (default: the launch's accelerate FSDP settings) plan per GPU, such as
--plan_num_processes 2 --plan_fsdp offload --optim adamw_torch for FSDP2 on two cards.
Exit code 0 when the plan fits, 1 when it does not, 2 on a bad argument."""
