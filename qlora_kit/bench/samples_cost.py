"""What the sample replies cost at an eval, against a training step and the eval loss, on the demo run.

    python tools/bench_samples.py [--prompts 3] [--max_new_tokens 64] [--eval_examples N] [--out bench_samples.json]

Loads the demo model as the recipe does (NF4, gradient checkpointing, LoRA of the demo preset),
then times, after one warm-up of each: a training step's forward and backward of one demo batch,
the eval loss over the demo's eval split, and greedy sample replies to the first eval prompts.
Prints JSON with wall and CPU seconds and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from qlora_kit.config import parse
from qlora_kit.data.batches import collate
from qlora_kit.data.dataset import build_datasets
from qlora_kit.log import setup_logging
from qlora_kit.model.load import choose_compute_dtype, load_quantized_model
from qlora_kit.model.lora import add_lora, choose_lora_dtype, enable_gradient_checkpointing
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.sources import resolve_model
from qlora_kit.train.loop import evaluate
from qlora_kit.train.loss import batch_loss_sum
from qlora_kit.train.samples import SampleReplies, prompts_from_eval

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "chat" / "demo.yaml"


def timed(work) -> tuple[float, float]:
    """Wall and CPU seconds of `work()`, after one untimed warm-up call."""
    work()
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--eval_examples", type=int, default=0, help="time the eval loss on the first N (0: all)")
    parser.add_argument("--out", default=None)
    options = parser.parse_args(argv)
    setup_logging()
    config = parse(["--config", str(DEMO)])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model(config.model.model_name_or_path)
    tokenizer = load_tokenizer(model_dir)
    train_data, eval_data, _ = build_datasets(config.data, tokenizer, config.train.seed)
    compute_dtype = choose_compute_dtype("auto", device)
    model = load_quantized_model(model_dir, config.model, compute_dtype, device)
    enable_gradient_checkpointing(model)
    model = add_lora(model, config.lora, choose_lora_dtype("auto", compute_dtype))
    model.train()
    batch = {k: v.to(device) for k, v in collate(
        [train_data[i] for i in range(config.train.per_device_train_batch_size)], tokenizer.pad_token_id).items()}
    if options.eval_examples:
        eval_data = eval_data.select(range(min(options.eval_examples, len(eval_data))))
    samples = SampleReplies(prompts_from_eval(eval_data, options.prompts), tokenizer, options.max_new_tokens)
    step = timed(lambda: batch_loss_sum(model, batch).backward())
    eval_loss = timed(lambda: evaluate(model, eval_data, config.train.per_device_eval_batch_size,
                                       tokenizer.pad_token_id, device))
    replies = timed(lambda: samples.rows(model, 0))
    rows = samples.rows(model, 0)
    result = {
        "device": str(device), "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "train_batch": config.train.per_device_train_batch_size, "eval_examples": len(eval_data),
        "prompts": len(samples.prompts), "max_new_tokens": options.max_new_tokens,
        "reply_tokens": [len(tokenizer(row["reply"], add_special_tokens=False)["input_ids"]) for row in rows],
        "train_step_forward_backward_s": step, "eval_loss_s": eval_loss, "sample_replies_s": replies,
        "note": "each pair is (wall seconds, CPU seconds of this process)",
    }
    print(json.dumps(result, indent=2))
    if options.out:
        Path(options.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
