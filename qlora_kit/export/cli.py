"""`python tools/export_merged.py`: the command line of the merge, and the recipe's `--export_merged true`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from qlora_kit import interrupts
from qlora_kit.config import ExportArguments, UserErrorParser, help_field
from qlora_kit.errors import UserError, exit_on_user_error
from qlora_kit.export.merge import MergeOptions, MergeResult, choose_device, export_merged, settings_for
from qlora_kit.log import setup_logging
from qlora_kit.model.load import DTYPES

MERGED_SUBFOLDER = "merged"
GGUF_SUBFOLDER = "gguf"


@dataclass
class MergeArguments:
    """Flags of tools/export_merged.py."""

    adapter_dir: str = help_field("The run folder (adapter_config.json, adapter_model.safetensors, run_config.yaml).")
    output_dir: str = help_field("Folder for the merged model; it must not exist or be empty (see --overwrite).")
    merge_base: Literal["nf4", "original"] = help_field(
        "nf4: merge into dequant(NF4(W)), the weights training saw, so the merged model computes what the adapter "
        "model computed. original: merge into the original weights W (drifts from the adapter model).", default="nf4")
    dtype: Literal["bfloat16", "float16", "float32"] = help_field("dtype of the merged model.", default="bfloat16")
    max_shard_size: str = help_field("Largest safetensors shard, e.g. 5GB or 500MB.", default="5GB")
    base_model: Optional[str] = help_field(
        "Base model folder or hub id (default: the one in run_config.yaml); checked against the base model "
        "fingerprint run_config.yaml records.", default=None)
    bnb_4bit_compute_dtype: Optional[Literal["bfloat16", "float16", "float32"]] = help_field(
        "The dtype training loaded the base in (default: from run_config.yaml; without one, required for "
        "--merge_base nf4 and --verify).", default=None)
    bnb_4bit_use_double_quant: Optional[bool] = help_field(
        "Whether training double-quantized the NF4 scales (default: from run_config.yaml; without one, required "
        "for --merge_base nf4 and --verify).", default=None)
    format: Literal["hf", "gguf"] = help_field(
        "hf: a transformers model folder (sharded safetensors). gguf: one .gguf file for llama.cpp / Ollama "
        "(Llama, SmolLM, Mistral, Qwen2 families), written into --output_dir.", default="hf")
    gguf_type: Literal["f16", "bf16", "q8_0"] = help_field(
        "With --format gguf: the type of the weight matrices (norms stay float32).", default="f16")
    verify: bool = help_field("Compare the merged model with the adapter model; writes merge_report.json. "
                         "(--format hf only; check a GGUF with tools/check_gguf.py.)", default=False)
    overwrite: bool = help_field("Replace a non-empty --output_dir (only once the new model is complete).", default=False)
    allow_other_base: bool = help_field(
        "Merge onto --base_model even though it is not the model the run recorded (its fingerprint differs); "
        "the merged model then does not compute what the adapter model computed.", default=False)
    device: Literal["auto", "cpu", "cuda"] = help_field("Where the arithmetic runs; auto: CUDA when there is one.",
                                                   default="auto")


def parse(argv: list[str]) -> MergeArguments:
    parser = UserErrorParser(MergeArguments, prog="python tools/export_merged.py", allow_abbrev=False,
                     description="Merge a LoRA run into its base model: an ordinary full-precision model folder.")
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def options_from(args: MergeArguments) -> MergeOptions:
    return MergeOptions(
        adapter_dir=Path(args.adapter_dir), output_dir=Path(args.output_dir), merge_base=args.merge_base,
        dtype=DTYPES[args.dtype], max_shard_size=args.max_shard_size, base_model=args.base_model,
        compute_dtype=args.bnb_4bit_compute_dtype, double_quant=args.bnb_4bit_use_double_quant,
        overwrite=args.overwrite, device=args.device, allow_other_base=args.allow_other_base,
    )


def merge_and_verify(options: MergeOptions, verify: bool, gguf_type: Optional[str] = None) -> MergeResult:
    """Export (an HF folder, or a GGUF file when `gguf_type` is given), then (if asked) compare the merged
    model with the adapter model."""
    if gguf_type is not None:
        if verify:
            raise UserError("--verify compares an HF folder with the adapter model; with --format gguf, export "
                            "--format hf too and compare them with tools/check_gguf.py")
        from qlora_kit.export.gguf import export_gguf  # imports gguf: only when asked

        return export_gguf(options, gguf_type)
    # With --verify its refusals come before anything is written; resolved once, as it fingerprints the base.
    settings = settings_for(options, verify=True) if verify else None
    result = export_merged(options, settings)
    if settings is not None:
        from qlora_kit.export.verify import verify_merge  # imports peft: only when asked

        verify_merge(options.adapter_dir, options.output_dir, settings, options.merge_base, options.dtype,
                     choose_device(options.device))
    return result


def export_run(run_dir: Path, args: ExportArguments) -> list[MergeResult]:
    """The recipe's exports: RUN/merged and/or RUN/gguf, each replaced if an earlier export of this run is there."""
    results = []
    if args.export_merged:
        options = MergeOptions(adapter_dir=run_dir, output_dir=run_dir / MERGED_SUBFOLDER,
                               merge_base=args.export_merge_base, dtype=DTYPES[args.export_dtype], overwrite=True)
        results.append(merge_and_verify(options, args.export_verify))
    if args.export_gguf:
        options = MergeOptions(adapter_dir=run_dir, output_dir=run_dir / GGUF_SUBFOLDER,
                               merge_base=args.export_merge_base, overwrite=True)
        results.append(merge_and_verify(options, False, args.export_gguf))
    return results


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> MergeResult:
    setup_logging()
    args = parse(sys.argv[1:] if argv is None else argv)
    interrupts.stage("merging the adapter into its base model", f"--output_dir {args.output_dir} was left as it "
                     f"was; run the same command to start again")
    return merge_and_verify(options_from(args), args.verify, args.gguf_type if args.format == "gguf" else None)
