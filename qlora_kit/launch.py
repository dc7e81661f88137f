"""What `accelerate launch` asked for, read from the environment variables it sets for each process.

`accelerate launch --num_processes N` sets WORLD_SIZE; with an FSDP configuration
(`--config_file recipes/accelerate/fsdp2.yaml`, or `--use_fsdp`) it also sets ACCELERATE_USE_FSDP and
the FSDP_* options. accelerate reads the same variables when it builds its FSDP plugin, but only on
a GPU: on a CPU it ignores them and runs plain data parallel. qlora_kit shards the model itself
(qlora_kit/model/shard.py, which says why), so it reads them here, the same way on both.
Nothing here imports torch, so the memory planner's command line reads it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from qlora_kit.errors import UserError


@dataclass(frozen=True)
class LaunchSettings:
    """The processes of the run and, when the launch asked for it, how FSDP shards the model.

    `fsdp`: the frozen NF4 base, the LoRA weights, their gradients and optimizer states are sharded
    across the processes (FSDP2's `fully_shard`, one unit per decoder layer), rather than each process
    holding all of them (data parallel).
    `offload_params`: FSDP keeps the shards in host RAM and copies each unit to the GPU for its use.
    `reshard_after_forward`: each unit's gathered weights are freed after its forward and gathered
    again for backward (less memory), rather than kept until its backward (less communication).
    """

    num_processes: int = 1
    fsdp: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True

    def describe(self) -> str:
        """One phrase for run_config.yaml, e.g. '2 processes, FSDP2-sharded'."""
        processes = f"{self.num_processes} process" + ("es" if self.num_processes != 1 else "")
        if not self.fsdp:
            return f"{processes}, data parallel" if self.num_processes > 1 else processes
        extra = ", parameters offloaded to host RAM" if self.offload_params else ""
        return f"{processes}, FSDP2-sharded{extra}"


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes")


def launch_settings(environ: Optional[Mapping[str, str]] = None) -> LaunchSettings:
    """The launch's settings from the environment (a process started without accelerate: one, no FSDP).

    Raises:
        UserError: the launch asked for FSDP version 1, which cannot shard 4-bit weights.
    """
    environ = os.environ if environ is None else environ
    num_processes = int(environ.get("WORLD_SIZE", "1") or 1)
    if not _flag(environ, "ACCELERATE_USE_FSDP", False):
        return LaunchSettings(num_processes=num_processes)
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the accelerate configuration asks for FSDP version {version}; qlora_kit shards with "
                        f"FSDP2 only: set fsdp_version: 2 in its fsdp_config (recipes/accelerate/fsdp2.yaml has it)")
    return LaunchSettings(
        num_processes=num_processes,
        fsdp=True,
        offload_params=_flag(environ, "FSDP_OFFLOAD_PARAMS", False),
        reshard_after_forward=_flag(environ, "FSDP_RESHARD_AFTER_FORWARD", True),
    )
