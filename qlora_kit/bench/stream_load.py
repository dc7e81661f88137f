"""Peak host RAM of the streaming loader on a random Llama-shaped model written in shards.

The logic of tools/measure_stream_load.py, its command line:

    python tools/measure_stream_load.py                # ~1.1B parameters (TinyLlama's shape)
    python tools/measure_stream_load.py --layers 4 --vocab 8192   # the size the tests use

Writes the random model (qlora_kit.bench.random_model) into safetensors shards of a few decoder
layers each (never whole in memory), loads it with `qlora_kit.model.stream_load.load_streaming` in
a fresh subprocess, and reports as JSON the subprocess's peak resident set (VmHWM, reset just
before loading) over its resident set before loading, next to the bytes of the placed model and
the measured working set of one tensor (the peak of reading, casting and quantizing the largest
tensors alone, in the same process). The model folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_random_model(folder: Path, args: argparse.Namespace) -> dict:
    """A random bf16 Llama in shards of `shard_layers` decoder layers, written a row chunk at a time."""
    import torch
    from transformers import LlamaConfig

    from qlora_kit.bench import random_model

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    random_model.write_random_model(folder, config, torch.bfloat16, layers_per_shard=args.shard_layers)
    sizes = [math.prod(spec.shape) for spec in random_model.state_specs(config, torch.bfloat16)]
    return {"parameters": sum(sizes), "checkpoint_bytes": 2 * sum(sizes), "largest_tensor_elements": max(sizes)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(folder: Path, dtype_name: str, cache: str | None = None) -> dict:
    """In this process: load the folder with the streaming loader and report the peak resident set."""
    import torch
    import bitsandbytes as bnb

    from qlora_kit.config import ModelArguments
    from qlora_kit.model.bnb_cpu import canonical_weight
    from qlora_kit.model.load import DTYPES
    from qlora_kit.model.stream_load import load_streaming

    args = ModelArguments(model_name_or_path=str(folder))
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    started = time.perf_counter()
    model = load_streaming(folder, args, DTYPES[dtype_name], torch.device("cpu"), quantized_cache=cache)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        if isinstance(tensor, bnb.nn.Params4bit) and tensor.quant_state is not None:
            state = canonical_weight(tensor)[1]
            for part in (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
                storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
    result = {"rss_before_load": before, "peak_rss": peak, "peak_over_before": peak - before,
              "placed_bytes": sum(storages.values()), "load_seconds": round(seconds, 1)}
    if cache is None:
        result["one_tensor_bytes"] = one_tensor_working_set(folder, DTYPES[dtype_name])
    return result


def one_tensor_working_set(folder: Path, dtype) -> int:
    """Peak resident set of reading, casting and (for a projection) quantizing the largest tensors, alone."""
    import bitsandbytes as bnb

    from qlora_kit.io.safetensors import read_checkpoint
    from qlora_kit.model.stream_load import release_freed_memory

    shards = sorted(folder.glob("*.safetensors"))
    sizes = {}
    for key, tensor in read_checkpoint(shards):
        sizes[key] = tensor.numel()
    # Every largest tensor of a distinct name pattern (gate, up and down projections; embeddings and lm_head):
    # ties of size differ in shape or in what is done to them, and the allocator's history in between.
    largest = {group: max(n for k, n in sizes.items() if ("_proj." in k) == group) for group in (True, False)}
    patterns = {}
    for key, count in sizes.items():
        if count == largest["_proj." in key]:
            patterns.setdefault(re.sub(r"\.\d+\.", ".N.", key), key)
    projections = {key for key in patterns.values() if "_proj." in key}
    worst = 0
    for wanted in patterns.values():
        release_freed_memory()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        for key, tensor in read_checkpoint(shards):
            if key == wanted:
                value = tensor.to(dtype)
                if key in projections:
                    value = bnb.nn.Params4bit(value, requires_grad=False, quant_type="nf4", blocksize=64,
                                              compress_statistics=True).to("cpu")
                del value
            del tensor
        worst = max(worst, _status("VmHWM") - before)
    return worst


def _child(folder: Path, dtype: str, cache: Path | None = None) -> dict:
    command = [sys.executable, "-m", "qlora_kit.bench.stream_load", "--measure", str(folder), "--dtype", dtype]
    if cache is not None:
        command += ["--cache_dir", str(cache)]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def add_shape_arguments(parser: argparse.ArgumentParser, shard_layers: int) -> None:
    """The random model's shape (TinyLlama's by default) and how many decoder layers each shard holds."""
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard_layers", type=int, default=shard_layers, help="decoder layers per safetensors shard")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, shard_layers=2)
    parser.add_argument("--dtype", default="float32", help="compute dtype of the load (float32 on CPU)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--cache", action="store_true",
                        help="also load with --quantized_cache twice (writing it, then reading it)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the subprocess's side
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.dtype, args.cache_dir)))
        return
    folder = Path(tempfile.mkdtemp(prefix="qlora_kit-stream-load-"))
    cached = {}
    try:
        written = write_random_model(folder / "model", args)
        measured = _child(folder / "model", args.dtype)
        if args.cache:
            for run in ("cache_write", "cache_read"):
                cached[run] = _child(folder / "model", args.dtype, folder / "nf4-cache")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {**written, **measured, "dtype": args.dtype,
              "peak_over_placed_bytes": measured["peak_over_before"] - measured["placed_bytes"], **cached}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
