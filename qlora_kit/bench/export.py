"""Measuring the merge: seconds and peak memory of one export in a fresh process, against `cp`.

`measure_merge` runs the export in a child process (`python -m qlora_kit.bench.export`), which
reports its own peak RSS (the kernel's high-water mark, VmHWM) and, on CUDA,
torch's peak allocated / reserved GPU memory. `copy_seconds` times `cp -r` plus `sync` of the
same base folder, the baseline the merge is compared with (the merge fsyncs its shards too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import psutil
import torch

from qlora_kit.bench.memory_track import peak_rss_bytes

CHILD_MARK = "MERGE_MEASUREMENT "


def measure_merge(adapter_dir: Path, output_dir: Path, merge_base: str = "nf4", max_shard_size: str = "5GB",
                  **options) -> dict:
    """Export in a child process and return its figures (seconds, peak RSS, GPU peaks, sizes).

    `options` are further MergeOptions fields (device, chunk_bytes, ...).
    """
    options = {"adapter_dir": str(adapter_dir), "output_dir": str(output_dir), "merge_base": merge_base,
               "max_shard_size": max_shard_size, "overwrite": True, **options}
    command = [sys.executable, "-m", "qlora_kit.bench.export", json.dumps(options)]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"merge child failed ({result.returncode}): {result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(CHILD_MARK))


def copy_seconds(source: Path, target: Path) -> float:
    """Wall seconds of `cp -r source target` and `sync` of the copied files; the copy is removed after."""
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    subprocess.run(["sync", *[str(file) for file in target.iterdir()]], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir() if file.is_file())


def memory_bound(largest_tensor_bytes: int) -> int:
    """The bound the merge's peak RSS is held to: 3 x the largest tensor + 1.5 GB."""
    return 3 * largest_tensor_bytes + int(1.5e9)


def run_benchmark(work_dir: Path, preset: str = "llama-1.5b", num_layers: Optional[int] = None,
                  max_shard_size: str = "1GB", modes: tuple[str, ...] = ("original", "nf4"), keep: bool = False) -> dict:
    """Write a random model and adapter, then time `cp` and each merge of it; remove the files unless `keep`."""
    from qlora_kit.bench.random_model import preset_config, write_random_model, write_random_run

    base, run = work_dir / "base", work_dir / "run"
    started = time.perf_counter()
    config = preset_config(preset, num_layers)
    write_random_model(base, config, max_shard_size=max_shard_size)
    write_random_run(run, base)
    report = {"preset": preset, "num_hidden_layers": config.num_hidden_layers, "base_bytes": folder_bytes(base),
              "make_seconds": time.perf_counter() - started, "cpu_threads": torch.get_num_threads(), "merges": {}}
    try:
        report["cp_seconds"] = copy_seconds(base, work_dir / "copy")
        if any(mode.startswith("gguf-") for mode in modes):
            _give_tokenizer(run)
        for mode in modes:
            gguf_options = {"gguf_type": mode.removeprefix("gguf-")} if mode.startswith("gguf-") else {}
            merge_base = "original" if gguf_options else mode
            figures = measure_merge(run, work_dir / f"merged-{mode}", merge_base, max_shard_size, **gguf_options)
            figures["ratio_to_cp"] = figures["seconds"] / report["cp_seconds"]
            figures["rss_bound_bytes"] = memory_bound(figures["largest_tensor_bytes"])
            figures["within_rss_bound"] = figures["peak_rss_bytes"] < figures["rss_bound_bytes"]
            report["merges"][mode] = figures
            shutil.rmtree(work_dir / f"merged-{mode}", ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _give_tokenizer(run: Path) -> None:
    """A GGUF file carries a tokenizer: the random run gets the demo model's."""
    from qlora_kit.model.tokenizer import load_tokenizer
    from qlora_kit.sources import demo_model_dir

    load_tokenizer(demo_model_dir()).save_pretrained(run)


def gpu_check(work_dir: Path, num_layers: Optional[int] = 8, tiny: bool = False) -> dict:
    """The 8B-shaped merge on this machine's GPU (CPU when there is none), and the CUDA NF4 bit-exactness check."""
    from qlora_kit.export.nf4 import compare_with_loader
    from qlora_kit.bench.random_model import preset_config, write_random_model, write_random_run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset, layers = ("tiny", None) if tiny else ("llama-8b", num_layers)
    base, run = work_dir / "base", work_dir / "run"
    report: dict = {"device": device, "preset": preset}
    try:
        check_dir = write_random_model(work_dir / "nf4-check", preset_config("tiny"), device=device)
        report["nf4_matches_loader"] = compare_with_loader(check_dir, torch.bfloat16, True, torch.device(device))
        started = time.perf_counter()
        config = preset_config(preset, layers)
        write_random_model(base, config, max_shard_size="5GB", device=device)
        write_random_run(run, base)
        report.update(num_hidden_layers=config.num_hidden_layers, base_bytes=folder_bytes(base),
                      make_seconds=time.perf_counter() - started)
        figures = measure_merge(run, work_dir / "merged", "nf4")
        figures["rss_bound_bytes"] = memory_bound(figures["largest_tensor_bytes"])
        figures["within_rss_bound"] = figures["peak_rss_bytes"] < figures["rss_bound_bytes"]
        report["merge"] = figures
        full_layers = preset_config(preset).num_hidden_layers
        if config.num_hidden_layers != full_layers:
            full_bytes = _full_model_bytes(preset)
            report["projected_full_model_seconds"] = figures["seconds"] * full_bytes / figures["bytes_written"]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _full_model_bytes(preset: str) -> int:
    from qlora_kit.bench.random_model import preset_config, state_specs

    return sum(spec.nbytes for spec in state_specs(preset_config(preset), torch.bfloat16))


def _child(options_json: str) -> None:
    """The measured process: one export, then one JSON line of figures on stdout."""
    from qlora_kit.export.merge import MergeOptions, export_merged
    from qlora_kit.log import setup_logging

    setup_logging()
    values = json.loads(options_json)
    gguf_type = values.pop("gguf_type", None)
    options = MergeOptions(**{**values, "adapter_dir": Path(values["adapter_dir"]),
                              "output_dir": Path(values["output_dir"])})
    rss_before = psutil.Process().memory_info().rss
    if gguf_type is not None:
        from qlora_kit.export.gguf import export_gguf

        result = export_gguf(options, gguf_type)
    else:
        result = export_merged(options)
    figures = {**asdict(result), "output_dir": str(result.output_dir), "merge_base": options.merge_base,
               "gguf_type": gguf_type, "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available() and result.device == "cuda":
        figures["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        figures["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        figures["gpu"] = torch.cuda.get_device_name()
    print(CHILD_MARK + json.dumps(figures), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
