"""Streaming dequantize-and-merge: base + LoRA -> an ordinary full-precision model folder.

The whole model is never loaded. The base checkpoint is read one tensor at a time (safetensors'
`safe_open`); a projection training held in NF4 is quantized and dequantized exactly as loading did
(`merge_base='nf4'`, the default: the weights training saw), or left as it is (`'original'`); its
LoRA delta is added in fp32 and the sum cast to the output dtype; row chunks of it go straight into
the output shard, whose header was written first. Peak memory is a few copies of the largest tensor
whatever the model or shard size. The arithmetic runs on CUDA when there is a GPU, else on the CPU.

Output: model*.safetensors (+ model.safetensors.index.json when sharded), config.json without
quantization_config and with the chosen dtype, generation_config.json, the run's tokenizer and chat
template, written into a hidden sibling folder and renamed into place at the end (folder.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from safetensors import safe_open

from qlora_kit.errors import UserError
from qlora_kit.export.adapter import LoraAdapter, LoraUpdate
from qlora_kit.export.folder import check_free_space, check_output_folder, staged_output
from qlora_kit.export.layout import BaseLayout, BaseTensor, describe_base
from qlora_kit.export.nf4 import nf4_round_trip
from qlora_kit.export.settings import TrainingSetup, training_setup
from qlora_kit.io.safetensors import StoredTensor, TensorSpec
from qlora_kit.io.shards import ShardWriter, plan_shards, write_index
from qlora_kit.log import logger, notice_once

MergeBase = Literal["nf4", "original"]
CHUNK_BYTES = 64 << 20  # fp32 bytes of one row chunk
NF4_BYTES_PER_WEIGHT = 8  # CPU quantization temporaries per weight, ~16 bytes, count half a chunk's worth
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.*", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.model", "*.tiktoken")


@dataclass
class MergeOptions:
    """One export: where from, where to, and how."""

    adapter_dir: Path
    output_dir: Path
    merge_base: MergeBase = "nf4"
    dtype: torch.dtype = torch.bfloat16
    max_shard_size: Union[int, str] = "5GB"
    base_model: Optional[str] = None
    compute_dtype: Optional[str] = None  # None: as the run recorded
    double_quant: Optional[bool] = None
    overwrite: bool = False
    device: str = "auto"  # auto: cuda when there is one
    allow_other_base: bool = False  # merge onto a base whose fingerprint is not the run's
    chunk_bytes: int = CHUNK_BYTES  # fp32 bytes of the row chunks the arithmetic works on


@dataclass
class TensorJob:
    """How one output tensor is made."""

    spec: TensorSpec
    source: BaseTensor
    update: Optional[str] = None  # adapter module whose LoRA delta is added
    requantize: bool = False  # NF4 round trip first


@dataclass
class MergeResult:
    output_dir: Path
    seconds: float
    bytes_written: int
    shards: int
    merged_modules: int
    largest_tensor_bytes: int
    device: str


def choose_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu or auto")
    return torch.device(choice)


def _lossless(source: torch.dtype, via: torch.dtype) -> bool:
    return source == via or (via == torch.float32 and source in (torch.bfloat16, torch.float16))


def plan_jobs(base: BaseLayout, adapter: LoraAdapter, options: MergeOptions) -> tuple[list[TensorJob], bool]:
    """One job per output tensor, in base file order; also whether tied embeddings must be untied."""
    modules = {name + ".weight": name for name in adapter.lora_modules}
    stored = set(base.by_model_name) | ({base.output_embedding} if base.tied else set())
    missing = [name for name in modules if name not in stored]
    if missing:
        raise UserError(f"the adapter changes {missing[0].removesuffix('.weight')}, which the base model in "
                        f"{base.folder} does not have; is --base_model the model it was trained on?")
    untie = base.tied and any(name in modules for name in (base.input_embedding, base.output_embedding))
    jobs = [_job(tensor, tensor.name, modules.get(tensor.model_name or ""), options) for tensor in base.tensors]
    if untie:
        notice_once("the adapter changes the tied input/output embeddings: writing the output embedding "
                    "separately (tie_word_embeddings false), as the adapter model computes")
        if base.output_embedding not in base.by_model_name:  # the usual case: only the input one is stored
            embedding = base.by_model_name[base.input_embedding]
            jobs.append(_job(embedding, base.output_embedding, modules.get(base.output_embedding), options))
    for job in jobs:
        if job.update is not None:
            adapter.check_fits(job.update, job.source.stored.spec.shape, job.source.transposed)
    return jobs, untie


def _job(tensor: BaseTensor, name: str, update: Optional[str], options: MergeOptions) -> TensorJob:
    spec = tensor.stored.spec
    dtype = options.dtype if spec.dtype.is_floating_point else spec.dtype
    return TensorJob(TensorSpec(name, spec.shape, dtype), tensor, update,
                     requantize=tensor.quantized and options.merge_base == "nf4")


class TensorSource:
    """Reads base tensors, whole or by rows, through safetensors' `safe_open`.

    The tensors safe_open returns are backed by its memory map, and every page touched stays mapped,
    counted in the process's RSS, while the handle is open: held across a shard, a handle would
    grow RSS to the shard's size. So each read opens its own handle (parsing a header costs well
    under a millisecond), and a page is unmapped as soon as the tensor read from it is dropped.
    """

    @staticmethod
    def whole(stored: StoredTensor) -> torch.Tensor:
        with safe_open(str(stored.file), framework="pt") as handle:
            return handle.get_tensor(stored.spec.name)

    @staticmethod
    def rows(stored: StoredTensor, start: int, stop: int) -> torch.Tensor:
        if len(stored.spec.shape) == 0:
            return TensorSource.whole(stored)
        with safe_open(str(stored.file), framework="pt") as handle:
            return handle.get_slice(stored.spec.name)[start:stop]


def row_ranges(shape: tuple[int, ...], chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) row ranges whose fp32 size stays under `chunk_bytes` (at least one row)."""
    if len(shape) == 0:
        yield 0, 1
        return
    row = 4
    for size in shape[1:]:
        row *= size
    step = max(1, chunk_bytes // max(row, 1))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


class Merger:
    """Makes each output tensor from its job, in row chunks, on `device`."""

    def __init__(self, source: TensorSource, adapter: LoraAdapter, settings: TrainingSetup, options: MergeOptions,
                 device: torch.device):
        self.source, self.adapter, self.settings, self.options, self.device = source, adapter, settings, options, device

    def can_copy(self, job: TensorJob) -> bool:
        """Unchanged bytes: no delta, no re-quantization, same dtype, and (nf4) no rounding by the compute dtype."""
        spec = job.source.stored.spec
        if job.update or job.requantize or job.spec.dtype != spec.dtype or self.adapter.has_base_weight(job.source.module):
            return False
        if not spec.dtype.is_floating_point or self.options.merge_base == "original":
            return True
        return _lossless(spec.dtype, self.settings.compute_dtype)

    def chunks(self, job: TensorJob) -> Iterator[torch.Tensor]:
        """The output tensor in row chunks, in the output dtype, on the CPU."""
        stored = job.source.stored
        base = self._base_tensor(job)
        rows = (lambda a, b: base[a:b]) if base is not None else (lambda a, b: self.source.rows(stored, a, b))
        update = self.adapter.update(job.update).to(self.device) if job.update else None
        factor = self._dora_factor(job, rows, update) if update is not None and update.magnitude is not None else None
        # A held base tensor (re-quantized) may be updated in place below: each row range is visited once.
        for start, stop in row_ranges(stored.spec.shape, self.options.chunk_bytes):
            values = self._fp32_rows(rows(start, stop), job)
            if update is not None:
                values += update.delta_rows(start, stop, job.source.transposed)
            if factor is not None:
                values *= factor[None, :] if job.source.transposed else factor[start:stop, None]
            yield self._cast(values, job.spec)

    def _base_tensor(self, job: TensorJob) -> Optional[torch.Tensor]:
        """The whole base tensor when it must be held: re-quantized, or replaced by the adapter's saved copy."""
        saved = self.adapter.base_weight(job.source.module) if self.adapter.has_base_weight(job.source.module) else None
        if not job.requantize:
            return saved
        s, elements = self.settings, self.options.chunk_bytes // NF4_BYTES_PER_WEIGHT
        # The read tensor is passed on without a name here, so nf4_round_trip can free it before dequantizing.
        return nf4_round_trip(saved if saved is not None else self.source.whole(job.source.stored), s.compute_dtype,
                              s.double_quant, job.source.transposed, self.device, elements)

    def _fp32_rows(self, values: torch.Tensor, job: TensorJob) -> torch.Tensor:
        values = values.to(self.device)
        if self.options.merge_base == "nf4" and values.is_floating_point():
            values = values.to(self.settings.compute_dtype)  # the dtype training saw every base tensor in
        return values.to(torch.float32) if values.is_floating_point() else values

    def _dora_factor(self, job: TensorJob, rows, update: LoraUpdate) -> torch.Tensor:
        """m / ||W + delta|| per output row (peft's DoRA merge), from a first pass over the rows."""
        shape = job.source.stored.spec.shape
        out_features = shape[1] if job.source.transposed else shape[0]
        squares = torch.zeros(out_features, dtype=torch.float32, device=self.device)
        for start, stop in row_ranges(shape, self.options.chunk_bytes):
            values = self._fp32_rows(rows(start, stop), job) + update.delta_rows(start, stop, job.source.transposed)
            if job.source.transposed:
                squares += values.square().sum(dim=0)
            else:
                squares[start:stop] = values.square().sum(dim=1)
        return update.magnitude / squares.sqrt()

    def _cast(self, values: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        out = values.to(spec.dtype)
        if spec.dtype == torch.float16 and not torch.isfinite(out).all():
            raise UserError(f"{spec.name} overflows float16 after the merge; export with --dtype bfloat16")
        return out.cpu()


def merged_config(config: dict, dtype: torch.dtype, untie: bool) -> dict:
    """The base config.json without quantization_config, with the output dtype (and untied if asked)."""
    merged = {key: value for key, value in config.items() if key != "quantization_config"}
    name = str(dtype).removeprefix("torch.")
    merged["dtype"] = name
    if "torch_dtype" in merged:
        merged["torch_dtype"] = name
    if untie:
        merged["tie_word_embeddings"] = False
        if isinstance(merged.get("text_config"), dict) and "tie_word_embeddings" in merged["text_config"]:
            merged["text_config"] = {**merged["text_config"], "tie_word_embeddings": False}
    return merged


def copy_side_files(adapter_dir: Path, base_dir: Path, target: Path) -> None:
    """generation_config.json and model code from the base; the tokenizer and chat template the run saved."""
    for name in ("generation_config.json",):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, target / name)
    for file in base_dir.glob("*.py"):
        shutil.copy2(file, target / file.name)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    copied = [file for pattern in TOKENIZER_FILES for file in tokenizer_dir.glob(pattern) if file.is_file()]
    for file in copied:
        shutil.copy2(file, target / file.name)
    if not copied:
        notice_once(f"neither {adapter_dir} nor {base_dir} holds a tokenizer: the merged folder has none")


def settings_for(options: MergeOptions, verify: bool) -> TrainingSetup:
    """The run's settings for this export; the NF4 settings are required when the merge or --verify uses them."""
    return training_setup(options.adapter_dir, options.base_model, options.compute_dtype, options.double_quant,
                        options.allow_other_base, quantization_needed=verify or options.merge_base == "nf4")


@dataclass
class MergePlan:
    """What every export resolves before writing: the adapter, the run's settings, the device, the base, the jobs."""

    adapter: LoraAdapter
    settings: TrainingSetup
    device: torch.device
    base: BaseLayout
    jobs: list[TensorJob]
    untie: bool


def plan_merge(options: MergeOptions, settings: Optional[TrainingSetup] = None) -> MergePlan:
    """Resolve and check everything a merge needs, and say the merge's choices; nothing is written."""
    adapter = LoraAdapter(options.adapter_dir)
    settings = settings or settings_for(options, verify=False)
    device = choose_device(options.device)
    check_output_folder(options.output_dir, {"base model": settings.base_dir, "adapter": options.adapter_dir},
                        options.overwrite)
    base = describe_base(settings.base_dir, settings.compute_dtype, settings.double_quant, settings.trust_remote_code)
    jobs, untie = plan_jobs(base, adapter, options)
    _say_choices(options, settings, device)
    return MergePlan(adapter, settings, device, base, jobs, untie)


def export_merged(options: MergeOptions, settings: Optional[TrainingSetup] = None) -> MergeResult:
    """Merge the adapter in `options.adapter_dir` into its base and write `options.output_dir`.

    Every check a user's input can fail (folders, names, shapes, disk space) runs before the first
    byte is written, and nothing named `output_dir` exists until the model is complete.

    Args:
        options: what to merge, and how.
        settings: the run's settings when the caller resolved them already (`settings_for`).
    """
    started = time.perf_counter()
    plan = plan_merge(options, settings)
    adapter, settings, device, base, jobs, untie = (plan.adapter, plan.settings, plan.device, plan.base, plan.jobs,
                                                    plan.untie)
    try:
        shards = plan_shards([job.spec for job in jobs], options.max_shard_size)
    except ValueError:
        raise UserError(f"--max_shard_size {options.max_shard_size} is not a size like 5GB or 500MB") from None
    total = sum(job.spec.nbytes for job in jobs)
    check_free_space(options.output_dir, total)
    by_name = {job.spec.name: job for job in jobs}
    with staged_output(options.output_dir) as partial:
        source = TensorSource()
        merger = Merger(source, adapter, settings, options, device)
        for filename, specs in shards.items():
            _write_shard(partial / filename, [by_name[spec.name] for spec in specs], merger)
        write_index(partial, shards)
        config = merged_config(base.config, options.dtype, untie)
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(options.adapter_dir, settings.base_dir, partial)
    seconds = time.perf_counter() - started
    logger.info(f"merged {len(adapter.lora_modules)} LoRA modules into {options.output_dir} "
                f"({total / 1e9:.2f} GB, {len(shards)} shard(s), {seconds:.1f} s on {device.type})")
    return MergeResult(options.output_dir, seconds, total, len(shards), len(adapter.lora_modules),
                       base.largest_tensor_bytes, device.type)


def _write_shard(path: Path, jobs: list[TensorJob], merger: Merger) -> None:
    with ShardWriter(path, [job.spec for job in jobs]) as writer:
        for job in jobs:
            stored = job.source.stored
            if merger.can_copy(job):
                with open(stored.file, "rb") as handle:
                    writer.copy_range(handle, stored.offset, stored.spec.nbytes)
                continue
            for chunk in merger.chunks(job):
                writer.write(chunk)


def _say_choices(options: MergeOptions, settings: TrainingSetup, device: torch.device) -> None:
    compute = str(settings.compute_dtype).removeprefix("torch.")
    if options.merge_base == "nf4" and settings.unchecked:
        notice_once(f"merge base nf4: the projections are quantized and dequantized in {compute}; not checked: "
                    f"{'; '.join(settings.unchecked)}, so it is not known that the merged model computes what the "
                    f"adapter model computed")
    elif options.merge_base == "nf4":
        notice_once(f"merge base nf4: the projections are quantized and dequantized in {compute} as training "
                    f"loaded them, so the merged model computes what the adapter model computed")
        if settings.trained_on.startswith("cuda") != (device.type == "cuda") and settings.trained_on != "unknown":
            notice_once(f"the run trained on {settings.trained_on} and this merge quantizes on {device.type}; "
                        f"bitsandbytes' kernels for the two may round a few block scales differently")
    else:
        notice_once("merge base original: the LoRA deltas are added to the original weights, not to the NF4 "
                    "weights training saw; the merged model will drift from the adapter model (see --verify)")
