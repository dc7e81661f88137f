"""Llama-3.1-70B's exact shape trained with QLoRA on one GPU capped at 24 GiB, by streaming layers.

The logic of tools/bench_70b.py, its command line:

    python tools/bench_70b.py --out bench_70b.json          # on a GPU with >= 48 GiB
    python tools/bench_70b.py --layers 20 --out b.json      # a shorter version
    python tools/bench_70b.py --tiny --out b.json           # the same code paths at a tiny size, on CPU

Random weights of Llama-3.1-70B's shape (80 layers, hidden 8192, intermediate 28672, 64 heads, 8 KV
heads, vocab 128256) are made and quantized to NF4 layer by layer on the GPU (never whole in bf16);
the memory planner decides how many stay on the GPU under the cap (its prediction is reported beside
the measured peak), and the others go to pinned host RAM as they are made. The process is
capped with torch.cuda.set_per_process_memory_fraction. r=16 LoRA on every projection, sequences
of 2048 tokens, a few optimizer steps with paged 8-bit AdamW, in layer-major order (one copy of
each streamed layer per pass per optimizer step). Reported: peak reserved and allocated GPU memory,
seconds per optimizer step, tokens/s, host-to-device bandwidth (alone, and achieved while
training), and the fraction of the step the GPU waited on copies. Then the same with every layer
resident at a 48 GiB cap, in the plain order, as the baseline. First, a probe of FSDP2's CPU
offload on 4-bit layers (the alternative to qlora_kit's hooks, see qlora_kit/memory/stream.py).
Progress lines carry the elapsed time; the JSON is rewritten after every phase.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from qlora_kit.bench.random_model import random_tensor  # noqa: E402
from qlora_kit.config import LoraArguments, ModelArguments, TrainArguments  # noqa: E402
from qlora_kit.memory.reorder import LayerMajorStep  # noqa: E402
from qlora_kit.memory.stream import LayerStreamer  # noqa: E402
from qlora_kit.model.bnb_cpu import keep_canonical_layout  # noqa: E402
from qlora_kit.model.lora import add_lora, enable_gradient_checkpointing  # noqa: E402
from qlora_kit.model.stream_load import Placement, TensorPlacer, build_empty_model, streamed_layer_indices  # noqa: E402
from qlora_kit.model.targets import find_decoder_blocks  # noqa: E402
from qlora_kit.train.loss import batch_loss_sum  # noqa: E402
from qlora_kit.train.optim import build_optimizer  # noqa: E402

GIB = 1 << 30
SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                 vocab_size=128256, num_hidden_layers=80)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, num_hidden_layers=4)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", flush=True)


class Report:
    """The results, rewritten to --out after every phase."""

    def __init__(self, path: str | None, **fields):
        self.path = Path(path) if path else None
        self.data = dict(fields)

    def __setitem__(self, key, value):
        self.data[key] = value
        self.data["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device: torch.device, size: int = GIB) -> float | None:
    """Pinned host -> GPU copy speed in GB/s (best of three)."""
    if device.type != "cuda":
        return None
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del host, target
    return round(size / best / 1e9, 2)


# ---- the FSDP2 probe --------------------------------------------------------------------------
def probe_fsdp2(device: torch.device, hidden: int, intermediate: int, layers: int, tokens: int) -> dict:
    """FSDP2 CPU offload against qlora_kit's hooks against all-resident, on a stack of 4-bit MLP blocks."""
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def linear4bit(fan_in: int, fan_out: int) -> nn.Module:
        with torch.device("meta"):
            module = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compute_dtype=dtype, quant_type="nf4")
        weight = torch.empty(fan_out, fan_in, dtype=dtype, device=device).normal_(0, 0.02)
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64,
                                          compress_statistics=True, module=module).to(device)
        return keep_canonical_layout(module)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = linear4bit(hidden, intermediate), linear4bit(intermediate, hidden)
            self.lora_a = nn.Linear(hidden, 16, bias=False, dtype=dtype, device=device)
            self.lora_b = nn.Linear(16, hidden, bias=False, dtype=dtype, device=device)

        def forward(self, x):
            return x + self.down(torch.nn.functional.silu(self.up(x))) + self.lora_b(self.lora_a(x))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    stack = Stack()
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)

    def run(repeats: int = 3) -> tuple:
        """Output, input gradient, best seconds per forward+backward, peak GiB, a LoRA gradient."""
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats + 1):
            inputs = x.clone().requires_grad_(True)
            sync(device)
            began = time.perf_counter()
            out = stack(inputs)
            out.float().pow(2).mean().backward()
            sync(device)
            times.append(time.perf_counter() - began)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
        grad_a = stack.blocks[0].lora_a.weight.grad
        result = out.detach().float(), inputs.grad.float(), min(times[1:]), peak
        stack.zero_grad(set_to_none=True)
        return result + (grad_a,)

    report: dict = {"blocks": layers, "tokens": tokens, "hidden": hidden, "intermediate": intermediate}
    out_ref, grad_ref, seconds, peak, _ = run()
    report["resident"] = {"s_per_iter": round(seconds, 4), "peak_allocated_gib": round(peak, 2)}
    streamer = LayerStreamer(stack, range(layers), device, layers_in_flight=2)
    out, grad, seconds, peak, _ = run()
    report["hooks"] = {"s_per_iter": round(seconds, 4), "peak_allocated_gib": round(peak, 2),
                       "same_output": bool(torch.equal(out, out_ref)), "same_input_grad": bool(torch.equal(grad, grad_ref)),
                       "max_abs_output_diff": float((out - out_ref).abs().max()),
                       "max_abs_input_grad_diff": float((grad - grad_ref).abs().max())}
    streamer.close(materialise=True)
    entry: dict = {}
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)
        mesh = init_device_mesh(device.type, (1,))
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        for block in stack.blocks:
            fully_shard(block, mesh=mesh, offload_policy=policy)
        fully_shard(stack, mesh=mesh, offload_policy=policy)
        entry["accepted"] = True
        entry["weight_type_after_sharding"] = type(stack.blocks[0].up.weight).__name__
        out, grad, seconds, peak, grad_a = run()
        entry.update({"s_per_iter": round(seconds, 4), "peak_allocated_gib": round(peak, 2),
                      "max_abs_output_diff": float((out - out_ref).abs().max()),
                      "max_abs_input_grad_diff": float((grad - grad_ref).abs().max()),
                      "lora_grad_device": str(grad_a.device) if grad_a is not None else None})
    except Exception as error:  # the probe's answer is whatever happened
        entry["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    report["fsdp2_cpu_offload"] = entry
    return report


# ---- the model --------------------------------------------------------------------------------
def layer_nf4_bytes(shape: dict) -> int:
    h, i, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    params = 2 * h * h + 2 * h * (kv * h // heads) + 3 * h * i
    return int(params * (0.5 + 1 / 64 + 4 / (64 * 256)))


def memory_plan(args, cap_bytes: int):
    """The memory planner's plan for the full 70B run under the cap: it picks the resident layers."""
    import psutil

    from qlora_kit.memory.budget import PlanSettings
    from qlora_kit.memory.plan import plan_memory
    from qlora_kit.memory.shapes import model_shape

    settings = PlanSettings(micro_batch_size=1, max_seq_length=args.seq, lora_r=args.lora_r, lora_dropout=0.0,
                           optim="paged_adamw_8bit", offload_activations=False,
                           layer_major_micro_batches=args.grad_accum)
    return plan_memory(model_shape("llama-3.1-70b"), settings, cap_bytes, psutil.virtual_memory().total)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, streamed: list[int], args):
    """Random weights made and quantized tensor by tensor on the device; streamed layers go to host RAM as made."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
    model = build_empty_model(config, ModelArguments(), dtype)
    blocks_path, _ = find_decoder_blocks(model)
    streamer = LayerStreamer(model, [], device, layers_in_flight=args.in_flight, measure=True,
                             expected_host_bytes=len(streamed) * layer_nf4_bytes(shape))
    placement = Placement(device, blocks_path)
    placer = TensorPlacer(model, placement, dtype)
    names = [(n, p.shape, n.endswith("norm.weight")) for n, p in model.named_parameters()]
    torch.manual_seed(0)
    current, planned = None, set(streamed)
    for name, shape_, is_norm in names:
        layer = placement.layer_of(name)
        if layer != current and current in planned:
            streamer.stream_layer(current)
        if current is not None and layer != current and current % 10 == 0:
            log(f"layer {current} made and quantized{' (streamed)' if current in planned else ''}")
        current = layer
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, bnb.nn.Linear4bit):
            shape_ = (module.out_features, module.in_features)
        value = random_tensor(shape_, dtype, device, 0.02, ones=is_norm)
        placer.put(name, value)
        del value
    if current in planned:
        streamer.stream_layer(current)
    model = placer.finish()
    return model, streamer


def micro_batches(shape: dict, args, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.grad_accum):
        ids = torch.randint(0, shape["vocab_size"], (1, args.seq), generator=generator)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    return batches


# ---- the training phases ----------------------------------------------------------------------
def train_steps(model, batches, step_fn, optimizer, trainable, device, count: int, streamer=None,
                first: int = 0) -> list[dict]:
    """`count` optimizer steps; per step its time, loss and (when streaming) copy statistics."""
    rows = []
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for step in range(first, first + count):
        if streamer is not None:
            streamer.reset_stats()
        sync(device)
        began = time.perf_counter()
        loss = step_fn(batches, tokens)
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - began
        row = {"step": step, "seconds": round(seconds, 3), "loss": round(float(loss) / tokens, 6)}
        if streamer is not None:
            stats = streamer.collect()
            row.update(wait_s=round(stats.wait_s, 3), copy_s=round(stats.copy_s, 3), copies=stats.copies,
                       bytes_copied=stats.bytes_copied, max_in_flight=stats.max_in_flight)
        rows.append(row)
        log(f"step {step}: {seconds:.2f} s, loss {row['loss']}" +
            (f", waited {row['wait_s']:.2f} s on copies" if streamer is not None else ""))
    return rows


def plain_step(model):
    """The plain order: each micro-batch's forward and backward (with the model's own checkpointing)."""
    def step(batches, tokens):
        total = 0.0
        for batch in batches:
            loss_sum = batch_loss_sum(model, batch)
            (loss_sum / tokens).backward()
            total += float(loss_sum.detach())
        return total
    return step


def summarise(rows: list[dict], warmup: int, device: torch.device, cap_gib: float | None, args) -> dict:
    timed = rows[warmup:] or rows
    seconds = sum(r["seconds"] for r in timed) / len(timed)
    summary = {"steps_timed": len(timed), "warmup_steps": warmup, "s_per_step": round(seconds, 3),
               "tokens_per_s": round(args.grad_accum * args.seq / seconds, 1), "steps": rows}
    if "wait_s" in timed[0]:
        summary["wait_fraction"] = round(sum(r["wait_s"] for r in timed) / sum(r["seconds"] for r in timed), 3)
        copy_s = sum(r["copy_s"] for r in timed)
        summary["bytes_streamed_per_step"] = int(sum(r["bytes_copied"] for r in timed) / len(timed))
        summary["copy_bandwidth_gbs"] = round(sum(r["bytes_copied"] for r in timed) / copy_s / 1e9, 2) if copy_s else None
        summary["max_in_flight"] = max(r["max_in_flight"] for r in timed)
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device) / GIB
        summary.update(peak_reserved_gib=round(reserved, 2),
                       peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2),
                       under_cap=bool(cap_gib is None or reserved <= cap_gib))
    return summary


def set_cap(device: torch.device, cap_gib: float) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def streamed_phase(model, streamer, batches, optimizer, trainable, device, args, report: Report) -> dict:
    """Layer-major steps under the cap; on out-of-memory, stream 4 more layers and try again.

    The warm-up step also checks the CUDA copies: its loss against the plain order's (computed
    through the streaming hooks, without gradients, before any update), and every layer's
    recomputed output against the boundary the forward stored in host RAM.
    """
    driver = LayerMajorStep(model, streamer, device, verify_recompute=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with torch.no_grad():
        plain_loss = sum(float(batch_loss_sum(model, batch)) for batch in batches) / tokens
    log(f"plain-order loss through the streaming hooks: {plain_loss:.6f}")
    retries = 0
    while True:
        failure = None
        try:
            rows = train_steps(model, batches, driver, optimizer, trainable, device, 1, streamer)
            report["checks"] = {"plain_order_loss": round(plain_loss, 6), "layer_major_loss": rows[0]["loss"],
                                "recompute_max_abs_diff": driver.recompute_max_diff}
            driver.verify_recompute = False
            rows += train_steps(model, batches, driver, optimizer, trainable, device, args.steps, streamer, first=1)
            break
        except torch.cuda.OutOfMemoryError as error:
            failure = str(error).split("\n")[0][:200]
        # out of the except block, so the failed step's tensors are gone with its traceback
        optimizer.zero_grad(set_to_none=True)
        resident = [i for i in range(len(find_decoder_blocks(model)[1])) if i not in streamer.layers]
        if retries >= 3 or not resident:
            raise RuntimeError(f"out of memory at {args.cap_gib} GiB even with {len(streamer.layers)} layers streamed: {failure}")
        retries += 1
        extra = resident[:: max(1, len(resident) // 4)][:4]
        for index in extra:
            streamer.stream_layer(index)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        log(f"out of memory ({failure}); streaming layers {extra} as well and starting again")
        report["streamed_retries"] = retries
    summary = summarise(rows, 1, device, args.cap_gib if device.type == "cuda" else None, args)
    summary.update(resident_layers=len(find_decoder_blocks(model)[1]) - len(streamer.layers),
                   streamed_layers=len(streamer.layers), layers_in_flight=args.in_flight, oom_retries=retries)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU (or GPU): checks the code paths")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 80, or 4 with --tiny); fewer layers keep the share that streams")
    parser.add_argument("--cap_gib", type=float, default=24.0, help="GPU memory cap of the streamed run")
    parser.add_argument("--resident_cap_gib", type=float, default=48.0, help="cap of the all-resident baseline")
    parser.add_argument("--resident", type=int, default=None, help="resident layers (default: from the cap)")
    parser.add_argument("--in_flight", type=int, default=2, help="streamed layers on the GPU at once")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 32 with --tiny)")
    parser.add_argument("--grad_accum", type=int, default=4, help="micro-batches (one sequence each) per step")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps, after one warm-up step")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--skip_fsdp", action="store_true", help="skip the FSDP2 probe")
    parser.add_argument("--skip_resident", action="store_true", help="skip the all-resident baseline")
    parser.add_argument("--budget_s", type=float, default=230, help="skip the baseline if it would end past this")
    parser.add_argument("--out", default=None, help="write the JSON here (rewritten after every phase)")
    args = parser.parse_args()

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = dict(SHAPE_TINY if args.tiny else SHAPE_70B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    args.seq = args.seq or (32 if args.tiny else 2048)
    import bitsandbytes
    import transformers
    report = Report(args.out, command=" ".join(["python", "tools/bench_70b.py"] + sys.argv[1:]),
                    date=time.strftime("%Y-%m-%d %H:%M"), device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    versions={"torch": torch.__version__, "transformers": transformers.__version__,
                              "bitsandbytes": bitsandbytes.__version__},
                    shape=shape, seq=args.seq, grad_accum=args.grad_accum, lora_r=args.lora_r)
    log(f"{report.data['device']}; shape {shape}")
    report["h2d_bandwidth_gbs"] = h2d_bandwidth(device)
    log(f"pinned host -> device: {report.data['h2d_bandwidth_gbs']} GB/s")

    if not args.skip_fsdp:
        dims = (shape["hidden_size"], shape["intermediate_size"], 4, args.seq)
        report["fsdp2_probe"] = probe_fsdp2(device, *dims)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"FSDP2 probe: {json.dumps(report.data['fsdp2_probe'])}")

    set_cap(device, args.cap_gib)
    layers = shape["num_hidden_layers"]
    plan = memory_plan(args, int(args.cap_gib * GIB)) if args.resident is None else None
    if plan is not None:  # its prediction, to hold against the measured peak
        report["plan"] = {"fits": plan.fits, "resident_layers": plan.resident_layers,
                          "predicted_peak_gpu_gib": round(plan.predicted_peak_gpu_bytes / GIB, 2),
                          "predicted_reserved_gib": round(plan.predicted_allocator_bytes / GIB, 2),
                          "host_ram_gib": round(plan.host_ram_bytes / GIB, 2)}
        log(f"memory plan for the 70B run: {json.dumps(report.data['plan'])}")
    if args.resident is not None:
        resident = args.resident
    elif device.type != "cuda":  # the code paths only: half the layers stream
        resident = layers // 2
    else:  # the plan's share of resident layers, so that a shorter run streams alike
        resident = round(plan.resident_layers * layers / SHAPE_70B["num_hidden_layers"])
    streamed = streamed_layer_indices(layers, resident)
    log(f"building: {resident} resident layers, {len(streamed)} streamed, {args.in_flight} in flight")
    began = time.perf_counter()
    model, streamer = build_model(shape, device, dtype, streamed, args)
    enable_gradient_checkpointing(model)
    # no dropout, so that the layer-major loss can be checked against the plain order's exactly
    model = add_lora(model, LoraArguments(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0), dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, TrainArguments(optim="paged_adamw_8bit", learning_rate=1e-4), device)
    pinned = streamer.arena.reserved_bytes
    report["build"] = {"seconds": round(time.perf_counter() - began, 1), "resident_layers": resident,
                       "streamed_layers": len(streamed), "pinned_host_gib": round(pinned / GIB, 2),
                       "nf4_layer_mib": round(layer_nf4_bytes(shape) / (1 << 20), 1),
                       "lora_parameters": sum(p.numel() for p in trainable)}
    log(f"built in {report.data['build']['seconds']} s; {pinned / GIB:.1f} GiB pinned in host RAM")

    batches = micro_batches(shape, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report["streamed"] = {"cap_gib": args.cap_gib,
                          **streamed_phase(model, streamer, batches, optimizer, trainable, device, args, report)}
    log(f"streamed: {json.dumps({k: v for k, v in report.data['streamed'].items() if k != 'steps'})}")

    total = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else math.inf
    per_step = report.data["streamed"]["s_per_step"] * (1 - report.data["streamed"].get("wait_fraction", 0))
    needed = (1 + args.steps) * per_step + 15
    if args.skip_resident:
        report["resident"] = {"skipped": "--skip_resident"}
    elif total < args.resident_cap_gib + 1:
        report["resident"] = {"skipped": f"the GPU has {total:.0f} GiB, below the {args.resident_cap_gib} GiB cap"}
    elif time.perf_counter() - STARTED + needed > args.budget_s:
        report["resident"] = {"skipped": f"about {needed:.0f} s more would pass --budget_s {args.budget_s}"}
    else:
        set_cap(device, args.resident_cap_gib)  # first: bringing the streamed layers back needs the room
        streamer.close(materialise=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log(f"all {layers} layers resident, cap {args.resident_cap_gib} GiB, plain micro-batch order")
        rows = train_steps(model, batches, plain_step(model), optimizer, trainable, device, 1 + args.steps)
        report["resident"] = {"cap_gib": args.resident_cap_gib,
                              **summarise(rows, 1, device, args.resident_cap_gib if device.type == "cuda" else None, args)}
        report["streamed_over_resident_time"] = round(report.data["streamed"]["s_per_step"] / report.data["resident"]["s_per_step"], 2)
        log(f"resident: {json.dumps({k: v for k, v in report.data['resident'].items() if k != 'steps'})}")
    report["done"] = True
    log("done")


if __name__ == "__main__":
    main()
