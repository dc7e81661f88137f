"""`python -m qlora_kit.recipes.chat`: QLoRA fine-tuning of a chat model, setup -> train -> save.

With no arguments it runs the built-in demo (recipes/chat/demo.yaml): SmolLM2-135M-Instruct on
the chatterbot-corpus English conversations, small enough for a CPU. Every field is
listed by --help; --config YAML sets many at once and flags override it. --preview_data N shows
what the run would train on and stops before the model: the training stack (peft, bitsandbytes,
accelerate, the model and training modules) is imported inside `run`, after that check, so a
preview does not wait for those imports.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from datasets import Dataset

from qlora_kit import interrupts
from qlora_kit.config import RunConfig, parse
from qlora_kit.data.dataset import build_datasets
from qlora_kit.data.preview import preview
from qlora_kit.data.report import DataReport
from qlora_kit.errors import exit_on_user_error
from qlora_kit.log import logger, setup_logging
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.sources import resolve_model

if TYPE_CHECKING:
    from qlora_kit.train.checkpoint import TrainState

DEMO_PRESET = Path(__file__).resolve().parents[2] / "recipes" / "chat" / "demo.yaml"


@dataclass
class RunResult:
    run_dir: Path
    model: Any  # the trained PeftModel, still in memory
    state: TrainState


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> Optional[RunResult]:
    """Parse the command line (no arguments: the demo preset) and run the recipe."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    interrupts.stage("reading the configuration")
    if not argv and DEMO_PRESET.is_file():
        logger.info(f"no arguments: running the built-in demo ({DEMO_PRESET.name})")
        argv = ["--config", str(DEMO_PRESET)]
    return run(parse(argv))


def run(config: RunConfig) -> Optional[RunResult]:
    """Setup -> train -> save, for a parsed configuration (with --preview_data: show the data and stop)."""
    if config.data.preview_data:
        _, tokenizer, train_data, _, data_report = load_data(config)
        print(preview(tokenizer, train_data, data_report, config.data.preview_data,
                      html_file=config.data.preview_data_file))
        return None
    from transformers import set_seed

    import qlora_kit
    from qlora_kit.config import write_run_config
    from qlora_kit.export.cli import export_run
    from qlora_kit.launch import launch_settings
    from qlora_kit.memory.apply import (apply_memory_settings, plan_for_run, refuse_streaming_across_processes,
                                        stream_arguments)
    from qlora_kit.memory.plan import format_table
    from qlora_kit.memory.reorder import layer_major_driver
    from qlora_kit.memory.stream import setup_streaming
    from qlora_kit.model.load import choose_compute_dtype
    from qlora_kit.model.lora import (add_lora, choose_lora_dtype, enable_gradient_checkpointing, log_dtype_choice,
                                      trainable_report)
    from qlora_kit.model.shard import load_sharded, refuse_unshardable, trainable_tensors
    from qlora_kit.model.stream_load import load_model
    from qlora_kit.output import (check_output_dir, check_resume, data_paths, finish_run, prepare_output_dir,
                                  run_identity)
    from qlora_kit.train.checkpoint import check_checkpoint_space, checkpoint_step
    from qlora_kit.train.loop import make_accelerator, total_optimizer_steps, train
    from qlora_kit.train.samples import sample_replies
    from qlora_kit.train.trackers import check_report_to, finish_trackers, make_trackers, start_trackers

    set_seed(config.train.seed)

    # Setup: every check a user's input can fail comes before anything is written.
    launch = launch_settings()
    if launch.fsdp:
        refuse_unshardable(config, launch)
    run_dir = Path(config.train.output_dir)
    resume_dir = check_output_dir(run_dir, config.train)
    trackers = make_trackers(check_report_to(config.train.report_to), run_dir,
                             config.train.run_name or run_dir.resolve().name, config.train.project,
                             resume_dir and checkpoint_step(resume_dir))
    accelerator = make_accelerator(log_with=trackers)
    model_dir, tokenizer, train_data, eval_data, data_report = load_data(config)
    logger.info(data_report.line())
    samples = sample_replies(config.train, tokenizer, eval_data)  # reads --eval_prompts before the model loads
    # What a resume must not change:
    identity = run_identity(model_dir, train_data, tokenizer.pad_token_id, accelerator.num_processes)
    if resume_dir is not None:
        check_resume(resume_dir, config, identity)

    compute_dtype = choose_compute_dtype(config.model.bnb_4bit_compute_dtype, accelerator.device)
    lora_dtype = choose_lora_dtype(config.lora.lora_dtype, compute_dtype)
    log_dtype_choice(compute_dtype, lora_dtype)
    interrupts.stage("loading the model")
    plan = plan_for_run(config, model_dir, accelerator.device, compute_dtype, lora_dtype)  # None: no GPU, or --gpu_memory none
    stream = stream_arguments(config.stream, plan)
    if launch.fsdp:  # sharded across the processes as it loads, the adapters added before
        model = load_sharded(model_dir, config, compute_dtype, lora_dtype, accelerator.device, launch)
        streamer = None
    else:
        refuse_streaming_across_processes(stream, model_dir, accelerator.num_processes, config.model.trust_remote_code)
        model = load_model(model_dir, config.model, stream, compute_dtype, accelerator.device)
        streamer = setup_streaming(model, stream.resident_layers, stream.layers_in_flight, accelerator.device)
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model = add_lora(model, config.lora, lora_dtype)
    apply_memory_settings(model, config, plan, accelerator.device)
    step_driver = layer_major_driver(model, streamer, stream.layer_major_accumulation,
                                     config.train.gradient_accumulation_steps, accelerator.num_processes, accelerator.device)
    logger.info(trainable_report(model))
    check_checkpoint_space(run_dir, model, config.train.optim)

    # The output folder: the resolved configuration and the tokenizer first.
    again = "run the same command again" + ("" if resume_dir else " with --overwrite_output_dir true")
    interrupts.stage("writing the run folder", again)
    prepare_output_dir(run_dir, resuming=resume_dir is not None, keep=data_paths(config.data))
    write_run_config(config, run_dir / "run_config.yaml", resolved={
        "base_model_dir": str(model_dir),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "lora_dtype": str(lora_dtype).removeprefix("torch."),
        "quantization": {"quant_type": "nf4", "double_quant": config.model.bnb_4bit_use_double_quant},
        "total_steps": total_optimizer_steps(len(train_data), config.train, accelerator.num_processes),
        "device": str(accelerator.device),
        "launch": launch.describe(),
        "memory_plan": plan and {k: v for k, v in plan.to_dict().items() if k != "rows"},
        "data": vars(data_report),
        "qlora_kit_version": qlora_kit.__version__,
        **identity,
    })
    tokenizer.save_pretrained(run_dir)
    start_trackers(accelerator, run_dir, config.train.project, {
        "run/data_report": data_report.line(), "run/memory_plan": format_table(plan) if plan else "no memory plan"})

    # Train, then save the adapter and the loss plot.
    interrupts.stage("starting training", again)
    try:
        state = train(model, train_data, eval_data, config.train, accelerator, run_dir, pad_id=tokenizer.pad_token_id,
                      resume_dir=resume_dir, step_driver=step_driver, samples=samples)
    finally:
        finish_trackers(accelerator)
    adapter = trainable_tensors(model) if launch.fsdp else None  # every process: gathered whole
    if accelerator.is_main_process:
        interrupts.stage("saving the adapter", f"the newest checkpoint in {run_dir / 'checkpoints'} holds the "
                         f"trained adapter: run the same command with --resume_from_checkpoint latest to save it")
        finish_run(run_dir, accelerator.unwrap_model(model), adapter)
        if config.export.export_merged or config.export.export_gguf:
            interrupts.stage("exporting the merged model", f"the adapter in {run_dir} is complete: export it with "
                             f"python tools/export_merged.py --adapter_dir {run_dir} --output_dir {run_dir / 'merged'}")
            export_run(run_dir, config.export)
    logger.info(f"done: {state.step} steps, {state.trained_tokens:,} trained tokens; adapter and metrics in {run_dir}")
    return RunResult(run_dir, model, state)


def load_data(config: RunConfig) -> tuple[Path, Any, Dataset, Optional[Dataset], DataReport]:
    """The model folder, its tokenizer, and the tokenized train and eval splits with their report."""
    interrupts.stage("finding the model")
    model_dir = resolve_model(config.model.model_name_or_path)
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    interrupts.stage("reading and tokenizing the data")
    train_data, eval_data, data_report = build_datasets(config.data, tokenizer, config.train.seed)
    return model_dir, tokenizer, train_data, eval_data, data_report


if __name__ == "__main__":
    main()
