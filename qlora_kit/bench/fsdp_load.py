"""Peak host RAM of each process of the FSDP2-sharded loader, against one process of the normal loader.

The logic of tools/measure_fsdp_load.py, its command line:

    python tools/measure_fsdp_load.py                  # ~1.1B parameters (TinyLlama's shape), 2 processes
    python tools/measure_fsdp_load.py --layers 4 --vocab 8192

Writes a random bf16 Llama in shards (bench/stream_load.py's writer), then in fresh processes on the
CPU (where the shares live in host RAM, as they do on a GPU machine with fsdp_offload_params):
- one process loads it with the normal loader (`load_model`) and adds LoRA;
- N processes under torchrun (gloo) load it with `load_sharded`.
Each reports its peak resident set (VmHWM) over its resident set before loading and the parameter
bytes it holds. The JSON printed holds both and the model's NF4 bytes; the folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qlora_kit.bench.stream_load import _status, add_shape_arguments, write_random_model


def _load(folder: Path, sharded: bool) -> dict:
    """In this process: load the folder (sharded or not) with LoRA, report the peak resident set growth."""
    import torch

    from qlora_kit.config import parse
    from qlora_kit.launch import launch_settings
    from qlora_kit.model.lora import add_lora
    from qlora_kit.model.shard import load_sharded, parameter_bytes
    from qlora_kit.model.stream_load import load_model

    if sharded:
        torch.distributed.init_process_group("gloo")
    config = parse(["--model_name_or_path", str(folder), "--optim", "adamw_torch"])
    cpu = torch.device("cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    if sharded:
        model = load_sharded(folder, config, torch.float32, torch.float32, cpu, launch_settings())
    else:
        model = add_lora(load_model(folder, config.model, config.stream, torch.float32, cpu), config.lora, torch.float32)
    held, whole = parameter_bytes(model)
    return {"peak_rss_growth_bytes": _status("VmHWM") - before, "held_parameter_bytes": held,
            "all_parameter_bytes": whole}


def _child(folder: Path, sharded: bool, out: Path) -> None:
    result = _load(folder, sharded)
    rank = os.environ.get("RANK", "0")
    (out / f"{'sharded' if sharded else 'plain'}-{rank}.json").write_text(json.dumps(result))


def measure(folder: Path, processes: int, work: Path) -> dict:
    """Run the plain load in one process and the sharded load in `processes`; their reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = [sys.executable, "-m", "qlora_kit.bench.fsdp_load", "--child", str(folder), "--work", str(work)]
    subprocess.run([*module, "--plain"], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
                "qlora_kit.bench.fsdp_load", "--child", str(folder), "--work", str(work)]
    subprocess.run(torchrun, check=True, env={**env, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    plain = json.loads((work / "plain-0.json").read_text())
    sharded = [json.loads((work / f"sharded-{rank}.json").read_text()) for rank in range(processes)]
    return {"processes": processes, "plain_one_process": plain, "sharded_per_process": sharded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, shard_layers=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, not args.plain, args.work)
        return
    work = Path(tempfile.mkdtemp(prefix="fsdp-load-"))
    try:
        shape = write_random_model(work / "model", args)
        result = {"model": shape, **measure(work / "model", args.processes, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
