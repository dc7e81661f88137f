"""Run configuration: typed dataclasses with help text, and `parse(argv)`.

Field names follow transformers' TrainingArguments and TRL where one exists. `parse` reads an
optional `--config YAML` (a flat mapping of field: value), then the command-line flags, which win.
YAML values are turned into command-line tokens, so both go through the same type checks of
transformers' `HfArgumentParser`. Every problem is a `UserError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from transformers import HfArgumentParser

from qlora_kit.errors import UserError

DTypeChoice = Literal["auto", "bfloat16", "float16", "float32"]

MAX_EVAL_FRACTION = 0.5  # beyond it the eval split would outgrow the training split
MAX_LEARNING_RATE = 1.0  # an AdamW step moves each weight by about this much: above 1 nothing useful is learned


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field with help text for `--help`."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    """Which base model, and how it is quantized."""

    _argument_group_name = "model"

    model_name_or_path: str = help_field(
        "Base model: a local Hugging Face folder, a hub id, or the built-in 'smollm2-135m-instruct'.",
        default="smollm2-135m-instruct",
    )
    trust_remote_code: bool = help_field("Allow the model's own Python code from its folder or the hub.", default=False)
    bnb_4bit_compute_dtype: DTypeChoice = help_field(
        "Dtype of the NF4 matmuls and the unquantized layers. auto: bfloat16 on GPUs that have it, "
        "float16 on older GPUs, float32 on CPU (bf16 matmuls are several times slower there).",
        default="auto",
    )
    bnb_4bit_use_double_quant: bool = help_field("Quantize the NF4 block scales too (saves ~0.37 bits/param).", default=True)
    attn_implementation: str = help_field("Attention kernel: sdpa, eager, flash_attention_2.", default="sdpa")


@dataclass
class LoraArguments:
    """The LoRA adapters."""

    _argument_group_name = "lora"

    lora_r: int = help_field("LoRA rank r.", default=16)
    lora_alpha: float = help_field("LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).", default=32)
    lora_dropout: float = help_field("Dropout on the LoRA input.", default=0.05)
    lora_target_modules: str = help_field(
        "'all': every attention and MLP projection, found from the model's own modules. Or a "
        "comma-separated list of module names, e.g. 'q_proj,v_proj'; lm_head and the embeddings "
        "are adapted only when named here.",
        default="all",
    )
    use_rslora: bool = help_field("Rank-stabilised LoRA: scale by alpha/sqrt(r).", default=False)
    use_dora: bool = help_field("Weight-decomposed LoRA (DoRA).", default=False)
    lora_dtype: DTypeChoice = help_field(
        "Dtype of the LoRA weights. auto: bfloat16 on GPUs that have it, else float32.", default="auto"
    )


@dataclass
class DataArguments:
    """The training data."""

    _argument_group_name = "data"

    dataset_name: str = help_field(
        "Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a save_to_disk folder, a hub id, "
        "or the built-in 'chatterbot-en'. Mix several with weights: 'a.jsonl:0.7,b.parquet:0.3' (or a YAML list).",
        default="chatterbot-en",
    )
    max_seq_length: int = help_field("Longest sequence in tokens; longer conversations are truncated.", default=512)
    eval_fraction: float = help_field(
        "Share of each source held out for the eval loss (0 for none), at most 0.5 so the training split is never "
        "smaller than the eval split; a few percent is enough for a steady eval loss. For a bigger eval set, "
        "give it with --eval_dataset_name.", default=0.05)
    assistant_only_loss: bool = help_field("Train on assistant tokens only (false: on all tokens).", default=True)
    eval_dataset_name: Optional[str] = help_field(
        "Held-out eval data, the same kinds as dataset_name; when set, eval_fraction is not used.", default=None
    )
    dataset_format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = help_field(
        "Record shape; auto: detected per source from its columns. text: language modelling, loss on all tokens.",
        default="auto",
    )
    truncation_policy: Literal["whole_turns", "cut", "drop"] = help_field(
        "Conversations longer than max_seq_length: whole_turns keeps the leading turns that fit (cuts when even "
        "the first reply does not), cut cuts at max_seq_length tokens, drop drops them; all are counted.",
        default="whole_turns",
    )
    packing: bool = help_field(
        "Pack several sequences into each max_seq_length row; each attends only to itself (position ids restart).",
        default=False,
    )
    strict: bool = help_field("Stop at the first bad record instead of skipping and counting it.", default=False)
    dataset_num_proc: Optional[int] = help_field(
        "Processes that tokenize the data (default: the CPU count, up to 8, for 5,000+ records; else 1).",
        default=None,
    )
    preview_data: int = help_field(
        "Tokenize the data as the run would, print the data report and this many training examples with the "
        "trained tokens marked (and a packed row's sequence boundaries with --packing), then exit without loading "
        "the model. 0: train.", default=0)
    preview_data_file: Optional[str] = help_field(
        "With --preview_data, also write the preview as an HTML file here.", default=None)


@dataclass
class TrainArguments:
    """The optimisation and the output folder."""

    _argument_group_name = "training"

    output_dir: str = help_field("Folder for the adapter, tokenizer, metrics and checkpoints.", default="runs/chat")
    overwrite_output_dir: bool = help_field(
        "Replace an output folder that holds an earlier run: only the run's own files (adapter, tokenizer, "
        "run_config.yaml, metrics.jsonl, loss.png, checkpoints/, merged/) are removed; others stay and are listed.",
        default=False)
    resume_from_checkpoint: Optional[str] = help_field(
        "Continue a run: 'latest' (the newest checkpoint in output_dir) or a checkpoint folder.", default=None
    )
    num_train_epochs: float = help_field("Passes over the training data (ignored when max_steps > 0).", default=1.0)
    max_steps: int = help_field("Optimizer steps to run; -1 runs num_train_epochs.", default=-1)
    per_device_train_batch_size: int = help_field("Sequences per micro-batch.", default=8)
    per_device_eval_batch_size: int = help_field("Sequences per eval batch.", default=8)
    gradient_accumulation_steps: int = help_field("Micro-batches per optimizer step.", default=1)
    learning_rate: float = help_field("Peak learning rate, in (0, 1]; QLoRA runs use 1e-5 to 5e-4.", default=2e-4)
    weight_decay: float = help_field("AdamW weight decay.", default=0.0)
    warmup_ratio: float = help_field("Share of the steps spent warming the learning rate up.", default=0.03)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = help_field("Learning-rate schedule.", default="cosine")
    max_grad_norm: float = help_field("Clip the gradient norm to this (0 to switch off).", default=0.3)
    optim: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = help_field(
        "Optimizer. The paged ones move their state to host RAM under memory pressure (CUDA only).",
        default="paged_adamw_8bit",
    )
    gradient_checkpointing: bool = help_field("Recompute activations in backward instead of keeping them.", default=True)
    seed: int = help_field("Seed for LoRA init, data order and dropout.", default=42)
    logging_steps: int = help_field("Log the training loss every N optimizer steps.", default=10)
    eval_steps: int = help_field("Compute the eval loss every N optimizer steps (0: only at the end).", default=50)
    save_steps: int = help_field("Save a checkpoint every N optimizer steps (0: only at the end).", default=100)
    save_total_limit: int = help_field("Keep only the newest N checkpoints (0: keep every one).", default=0)
    keep_best_checkpoint: bool = help_field(
        "With --save_total_limit, also keep the checkpoint with the lowest eval loss.", default=False
    )
    max_nonfinite_steps: int = help_field(
        "Skip an optimizer step whose loss or gradient norm is NaN or inf; stop after this many in a row "
        "(0: no guard: such updates are applied, and the run stops rather than save weights holding NaN or inf).",
        default=5,
    )
    report_to: str = help_field(
        "Experiment trackers that receive the metrics.jsonl rows, the run config, the data report and the memory "
        "plan: none, tensorboard, wandb, mlflow, trackio, a comma-separated list of them, or all (every one "
        "installed). metrics.jsonl and loss.png are written whatever this is.", default="none")
    run_name: Optional[str] = help_field("The run's name in the trackers (default: the output folder's name).",
                                    default=None)
    project: str = help_field("The trackers' project (wandb, trackio) or experiment (mlflow).", default="qlora_kit")
    eval_prompts: Optional[str] = help_field(
        "A .jsonl file of prompts ({\"prompt\": ...} or {\"messages\": [...]}) answered greedily at each eval, "
        "logged with a repeated-n-gram rate. Unset: the first --eval_num_prompts eval conversations.", default=None)
    eval_num_prompts: int = help_field("Sample replies at each eval (0: none); the first N prompts are used.", default=3)
    eval_max_new_tokens: int = help_field("Longest sample reply, in tokens.", default=64)


@dataclass
class MemoryArguments:
    """GPU memory: the plan made from the model's config before loading, and the memory savers."""

    _argument_group_name = "memory"

    gpu_memory: str = help_field(
        "GPU memory to plan for: 'auto' (the card's, on a GPU), a size such as 24GiB or 80GB, or 'none'. "
        "The plan is printed and applied; a run that cannot fit is refused with what is missing.",
        default="auto",
    )
    offload_activations: Optional[bool] = help_field(
        "Keep the checkpointed hidden states in pinned host RAM, prefetched back for backward. "
        "Unset: the plan decides (off without a plan).",
        default=None,
    )
    loss_chunk_size: Optional[int] = help_field(
        "Trained tokens per chunk of the loss, so the full logits never exist; 0: the plain loss over "
        "full logits. Unset: sized from the vocabulary (256 MiB of fp32 logits per chunk).",
        default=None,
    )
    plan_num_processes: int = help_field(
        "Processes to plan for (one per GPU; the plan is per GPU); 0: the launch's (WORLD_SIZE).", default=0
    )
    plan_fsdp: Literal["auto", "true", "false", "offload"] = help_field(
        "Plan for FSDP2 sharding across the processes: true, offload (fsdp_offload_params: the shards wait in "
        "host RAM), false (data parallel), or auto: the launch's (accelerate's FSDP settings).",
        default="auto",
    )


@dataclass
class StreamArguments:
    """Models bigger than the GPU: frozen NF4 layers streamed from host RAM (qlora_kit.memory.stream)."""

    _argument_group_name = "streaming"

    resident_layers: int = help_field(
        "Decoder layers kept on the GPU; the others wait in pinned host RAM in NF4 and are copied to the "
        "GPU just before they are needed. -1: the memory plan decides (all stay on the GPU when they fit, "
        "and when there is no plan).",
        default=-1,
    )
    layers_in_flight: int = help_field(
        "Most streamed layers on the GPU at once: the one computing and those being copied ahead.", default=2
    )
    layer_major_accumulation: bool = help_field(
        "When layers stream and gradient_accumulation_steps > 1, run every micro-batch of an optimizer step "
        "through a streamed layer before the next (boundary activations wait in host RAM), so the weights "
        "cross PCIe twice per optimizer step instead of twice per micro-batch.",
        default=True,
    )
    quantized_cache: Optional[str] = help_field(
        "Folder holding the quantized model: written on the first run, read on later ones instead of "
        "the checkpoint; refused if the source model or the quantization settings differ.",
        default=None,
    )


@dataclass
class ExportArguments:
    """Merging the adapter into the base at the end of the run (the same merge as tools/export_merged.py)."""

    _argument_group_name = "export"

    export_merged: bool = help_field("At the end, write the base with the adapter merged in to OUTPUT_DIR/merged.",
                                default=False)
    export_merge_base: Literal["nf4", "original"] = help_field(
        "nf4: merge into the dequantized NF4 weights training saw (the merged model matches the adapter model); "
        "original: into the original weights.", default="nf4")
    export_dtype: Literal["bfloat16", "float16", "float32"] = help_field("dtype of the merged model.", default="bfloat16")
    export_verify: bool = help_field("Compare the merged model with the adapter model; writes merge_report.json.",
                                default=False)
    export_gguf: Optional[Literal["f16", "bf16", "q8_0"]] = help_field(
        "At the end, also write OUTPUT_DIR/gguf/model-TYPE.gguf for llama.cpp / Ollama, with weight matrices "
        "of this type.", default=None)


ARGUMENT_CLASSES = (ModelArguments, LoraArguments, DataArguments, TrainArguments, MemoryArguments,
                    StreamArguments, ExportArguments)


@dataclass
class RunConfig:
    """Every field of a run, grouped."""

    model: ModelArguments
    lora: LoraArguments
    data: DataArguments
    train: TrainArguments
    memory: MemoryArguments = field(default_factory=MemoryArguments)
    stream: StreamArguments = field(default_factory=StreamArguments)
    export: ExportArguments = field(default_factory=ExportArguments)

    def to_dict(self) -> dict[str, Any]:
        """All fields in one flat mapping, as a --config YAML holds them."""
        flat: dict[str, Any] = {}
        for group in (self.model, self.lora, self.data, self.train, self.memory, self.stream, self.export):
            flat.update(dataclasses.asdict(group))
        return flat


def field_names() -> set[str]:
    """Names of every field a YAML or a flag may set."""
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


class UserErrorParser(HfArgumentParser):
    """HfArgumentParser whose errors are a `UserError` (one line, exit 2) instead of usage text."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see --help for every field)")


def build_parser() -> HfArgumentParser:
    parser = UserErrorParser(
        ARGUMENT_CLASSES,
        prog="python -m qlora_kit.recipes.chat",
        allow_abbrev=False,
        description="QLoRA fine-tuning of a chat model. Flags override the fields of --config YAML.",
    )
    parser.add_argument("--config", default=None, help="A YAML file of field: value pairs (see recipes/chat/).")
    return parser


def _split_config_flag(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """Take `--config PATH` (or `--config=PATH`) out of argv."""
    rest: list[str] = []
    config_path = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a YAML file path")
            config_path, i = argv[i + 1], i + 2
            continue
        if token.startswith("--config="):
            config_path = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    return config_path, rest


def read_yaml_config(path: str) -> dict[str, Any]:
    """Read a flat YAML mapping of fields; refuse unknown fields, naming them and the file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of field: value")
    unknown = sorted(set(values) - field_names())
    if unknown:
        raise UserError(f"unknown field(s) in {path}: {', '.join(unknown)} (see --help for every field)")
    return values


# Fields that take several data sources: a YAML list of them ('a.jsonl:0.7', or {name: a.jsonl, weight: 0.7})
# becomes the one comma-separated value the flag takes.
SOURCE_LIST_FIELDS = ("dataset_name", "eval_dataset_name")


def _source_list(items: list[Any]) -> str:
    entries = [f"{item['name']}:{item['weight']}" if isinstance(item, dict) and "weight" in item
               else str(item["name"]) if isinstance(item, dict) and "name" in item else str(item) for item in items]
    return ",".join(entries)


def _as_tokens(values: dict[str, Any]) -> list[str]:
    """Turn YAML values into command-line tokens, so argparse checks their types the same way."""
    tokens: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if name in SOURCE_LIST_FIELDS and isinstance(value, list):
            value = _source_list(value)
        items = value if isinstance(value, list) else [value]
        tokens.append(f"--{name}")
        tokens.extend(str(item).lower() if isinstance(item, bool) else str(item) for item in items)
    return tokens


NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def _attach_negative_values(tokens: list[str]) -> list[str]:
    """`--field -1e-4` -> `--field=-1e-4`, so argparse takes a negative number as the value, not as a flag.

    argparse reads `-1e-4` (unlike `-0.0001`) as an option and would say "expected one argument";
    joined, the number reaches the field's range check, which says what is allowed.
    """
    joined: list[str] = []
    for token in tokens:
        previous = joined[-1] if joined else ""
        if NUMBER.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def parse(argv: Optional[list[str]] = None) -> RunConfig:
    """Parse `--config YAML` and flags into a validated `RunConfig`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config_flag(argv)
    values = read_yaml_config(config_path) if config_path else {}
    parser = build_parser()
    parser.set_defaults(**{name: None for name, value in values.items() if value is None})
    *groups, unknown = parser.parse_args_into_dataclasses(
        args=_attach_negative_values(_as_tokens(values) + argv), look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)} (see --help for every field)")
    config = RunConfig(*groups[: len(ARGUMENT_CLASSES)])
    validate(config)
    return config


# The range of every numeric field: field -> (test, what the field must be). Float fields must
# also be finite (NaN and inf are refused before any range is tested).
NUMERIC_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora_r": (lambda v: v > 0, "a positive integer"),
    "lora_alpha": (lambda v: v > 0, "positive"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_seq_length": (lambda v: v >= 2, "at least 2"),
    "eval_fraction": (lambda v: 0 <= v <= MAX_EVAL_FRACTION,
                      f"in [0, {MAX_EVAL_FRACTION}] (more would train on fewer examples than it evaluates; "
                      f"give a separate eval set with --eval_dataset_name)"),
    "dataset_num_proc": (lambda v: v >= 1, "at least 1"),
    "num_train_epochs": (lambda v: v >= 0, "0 or positive"),
    "max_steps": (lambda v: v == -1 or v > 0, "-1 (run --num_train_epochs) or a positive number of steps"),
    "per_device_train_batch_size": (lambda v: v >= 1, "at least 1"),
    "plan_num_processes": (lambda v: v >= 0, "0 (the launch's) or a number of processes"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1"),
    "learning_rate": (lambda v: 0 < v <= MAX_LEARNING_RATE,
                      f"in (0, {MAX_LEARNING_RATE:g}] (AdamW moves each weight by about the learning rate per step; "
                      f"QLoRA runs use 1e-5 to 5e-4)"),
    "weight_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, "0 (off) or positive"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "logging_steps": (lambda v: v >= 1, "at least 1"),
    "eval_steps": (lambda v: v >= 0, "0 (only at the end) or positive"),
    "save_steps": (lambda v: v >= 0, "0 (only at the end) or positive"),
    "save_total_limit": (lambda v: v >= 0, "0 (keep every checkpoint) or positive"),
    "max_nonfinite_steps": (lambda v: v >= 0, "0 (no guard) or positive"),
    "loss_chunk_size": (lambda v: v >= 0, "0 (plain loss) or positive"),
    "preview_data": (lambda v: v >= 0, "0 (train) or a number of examples to show"),
    "eval_num_prompts": (lambda v: v >= 0, "0 (no sample replies) or positive"),
    "eval_max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "resident_layers": (lambda v: v >= -1, "-1 (the plan decides) or a number of layers"),
    "layers_in_flight": (lambda v: v >= 1, "at least 1"),
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v > 0, "positive"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
}


def check_numbers(values: dict[str, Any]) -> None:
    """Refuse a numeric field that is not finite or out of its range (NUMERIC_RANGES), naming it.

    Args:
        values: field -> value, as `RunConfig.to_dict()` gives them; None means "unset" and is not checked.

    Raises:
        UserError: for the first field that fails.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
        test, allowed = NUMERIC_RANGES.get(name, (None, ""))
        if test is not None and not test(value):
            raise UserError(f"--{name} must be {allowed}, got {value}")


def validate(config: RunConfig) -> None:
    """Refuse values that cannot work, naming the field: run by `parse`, before anything is loaded."""
    check_numbers(config.to_dict())
    checks = [
        (config.train.max_steps > 0 or config.train.num_train_epochs > 0,
         "set --max_steps or --num_train_epochs to a positive number"),
        (not (config.train.keep_best_checkpoint and config.train.eval_steps and config.train.save_steps
              and config.train.save_steps % config.train.eval_steps),
         "--keep_best_checkpoint needs --save_steps to be a multiple of --eval_steps, so checkpoints have an eval loss"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    _validate_memory(config.memory)
    from qlora_kit.train.trackers import check_report_to

    check_report_to(config.train.report_to)


def _validate_memory(args: MemoryArguments) -> None:
    from qlora_kit.memory.plan import parse_memory_size

    if args.gpu_memory not in ("auto", "none"):
        parse_memory_size(args.gpu_memory, "--gpu_memory")


def write_run_config(config: RunConfig, path: Path, resolved: dict[str, Any]) -> None:
    """Write every field, plus what was resolved from them (model folder, dtypes), as YAML."""
    document = {**config.to_dict(), "resolved": resolved}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
