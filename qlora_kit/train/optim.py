"""Optimizers (bitsandbytes' paged and 8-bit AdamW, or torch's) and learning-rate schedules."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import torch
from transformers import get_scheduler

from qlora_kit.config import TrainArguments
from qlora_kit.log import notice_once

OPTIMIZERS = {
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw_torch": torch.optim.AdamW,
}


def build_optimizer(parameters: list[torch.nn.Parameter], args: TrainArguments, device: torch.device):
    """The optimizer named by --optim over the trainable parameters."""
    if args.optim.startswith("paged") and device.type != "cuda":
        notice_once(f"{args.optim}: no CUDA here, so bitsandbytes runs it unpaged")
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # torch's fused AdamW can skip a step on the device (found_inf), which the non-finite guard uses.
    extra = {"fused": True} if args.optim == "adamw_torch" else {}
    return OPTIMIZERS[args.optim](parameters, lr=args.learning_rate, weight_decay=args.weight_decay, **extra)


def build_scheduler(optimizer, args: TrainArguments, total_steps: int):
    """Warmup over warmup_ratio of the steps, then the named schedule down to zero."""
    warmup = round(args.warmup_ratio * total_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
