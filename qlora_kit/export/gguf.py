"""GGUF export: the merged model as one .gguf file that llama.cpp and Ollama run.

The tensors come from the same streaming merge as the HF export (merge.py: base tensor + LoRA
delta, in fp32 row chunks); each chunk is converted to the file's type and appended to the file,
whose header and tensor table were written first, so peak memory stays a few copies of the largest
tensor as in the HF export. The query and key projections of the Llama family are the exception:
llama.cpp wants their rows permuted head by head (it rotates interleaved pairs where transformers
rotates halves), so those two tensors are held whole while they are permuted.

The file is written with the `gguf` package (no llama.cpp build): tensor names from its tensor
map, hyper-parameters under llama.cpp's keys, the tokenizer and chat template (gguf_vocab.py).
Types, as llama.cpp's converter chooses them: norms and biases (1-D tensors) stay float32;
matrices are f16, bf16, or q8_0 (blocks of 32 values with one f16 scale; a matrix whose rows are
not a multiple of 32 falls back to f16, said once). Supported families: Llama (and SmolLM),
Mistral, Qwen2 / Qwen2.5; others are refused before anything is written. The file is written into
a hidden sibling folder and renamed into place at the end, as the HF export is (folder.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import gguf
import numpy as np
import torch

from qlora_kit.errors import UserError
from qlora_kit.export.folder import check_free_space, staged_output
from qlora_kit.export.gguf_vocab import add_tokenizer
from qlora_kit.export.merge import Merger, MergeOptions, MergeResult, TensorJob, TensorSource, plan_merge
from qlora_kit.export.settings import TrainingSetup
from qlora_kit.log import logger, notice_once

GgufType = Literal["f16", "bf16", "q8_0"]
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class Family:
    """How one model family is written: llama.cpp's architecture, and whether q/k rows are permuted."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


def gguf_file_name(gguf_type: str) -> str:
    """The file's name inside the export folder."""
    return f"model-{gguf_type}.gguf"


def family_of(config: dict) -> Family:
    """The family of a config.json; refused when the exporter does not know it or its RoPE scaling."""
    model_type = config.get("model_type", "unknown")
    if model_type not in FAMILIES:
        raise UserError(f"GGUF export supports the {', '.join(FAMILIES)} families; this model is {model_type}: "
                        f"export an HF folder instead (--format hf)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"the model uses {rope_type} RoPE scaling, which the GGUF export does not write yet; "
                        f"export an HF folder instead (--format hf)")
    return FAMILIES[model_type]


def add_hyper_parameters(writer: gguf.GGUFWriter, config: dict, file_type: gguf.LlamaFileType) -> None:
    """The model's shape under llama.cpp's keys (`{arch}.block_count`, ...)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass
class GgufTensor:
    """One tensor of the file: where it comes from, its GGUF name and type, and its q/k permutation."""

    job: TensorJob
    name: str
    qtype: gguf.GGMLQuantizationType
    permute_heads: Optional[int] = None  # heads to permute the rows by (llama's q and k)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.job.spec.shape

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def plan_tensors(jobs: list[TensorJob], config: dict, family: Family, gguf_type: str) -> list[GgufTensor]:
    """Name, type and permutation of each output tensor, in the merge's order."""
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    matrix_type = GGUF_TYPES[gguf_type][0]
    planned = []
    for job in jobs:
        name = names.get_name(job.spec.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"the checkpoint tensor {job.spec.name} has no GGUF name for {family.arch.name.lower()}; "
                            f"export an HF folder instead (--format hf)")
        qtype = F32 if len(job.spec.shape) < 2 else matrix_type
        if qtype == gguf.GGMLQuantizationType.Q8_0 and job.spec.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            notice_once(f"{job.spec.name}: rows of {job.spec.shape[-1]} values are not whole q8_0 blocks of 32; "
                        f"writing it (and any like it) as f16")
            qtype = gguf.GGMLQuantizationType.F16
        permute = None
        if family.permute_qk and ".attn_q." in name:
            permute = heads
        elif family.permute_qk and ".attn_k." in name:
            permute = kv_heads
        planned.append(GgufTensor(job, name, qtype, permute))
    return planned


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' rotate-half layout to llama.cpp's interleaved one."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def encode(values: torch.Tensor, qtype: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    """fp32 rows in the file's type, as raw bytes in a numpy array."""
    if qtype == F32:
        return values.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        half = values.to(torch.float16)
        if not torch.isfinite(half).all():
            raise UserError(f"{name} overflows float16 after the merge; export with --gguf_type bf16")
        return half.numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(values.numpy(), qtype)


def tensor_bytes(tensor: GgufTensor, merger: Merger) -> Iterator[np.ndarray]:
    """The tensor's bytes in row chunks (whole when its rows are permuted)."""
    chunks = merger.chunks(tensor.job)
    if tensor.permute_heads is not None:
        chunks = iter([permute_rows(torch.cat(list(chunks)), tensor.permute_heads)])
    for chunk in chunks:
        yield encode(chunk.float(), tensor.qtype, tensor.job.spec.name)


def write_gguf(path: Path, writer: gguf.GGUFWriter, tensors: list[GgufTensor], merger: Merger) -> None:
    """Write the header, the metadata and the tensor table, then every tensor's bytes in table order."""
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    for tensor in tensors:
        writer.write_padding(out, out.tell())
        written = 0
        for data in tensor_bytes(tensor, merger):
            data.tofile(out)
            written += data.nbytes
        if written != tensor.nbytes:
            raise RuntimeError(f"{tensor.name}: wrote {written} bytes where its table entry says {tensor.nbytes}")
        writer.write_padding(out, written)
    writer.close()


def export_gguf(options: MergeOptions, gguf_type: GgufType, settings: Optional[TrainingSetup] = None) -> MergeResult:
    """Merge the adapter into its base and write `options.output_dir`/model-TYPE.gguf (and an Ollama Modelfile).

    Every check a user's input can fail runs before the first byte is written, and nothing named
    `output_dir` exists until the file is complete.

    Args:
        options: what to merge (its dtype and max_shard_size are not used: the file's type decides).
        gguf_type: f16, bf16 or q8_0 for the matrices.
        settings: the run's settings when the caller resolved them already (`settings_for`).
    """
    started = time.perf_counter()
    options = dataclasses.replace(options, dtype=torch.float32)  # the merge's chunks; `encode` casts them
    plan = plan_merge(options, settings)
    adapter, settings, device, base = plan.adapter, plan.settings, plan.device, plan.base
    family = family_of(base.config)
    tensors = plan_tensors(plan.jobs, base.config, family, gguf_type)
    total = sum(tensor.nbytes for tensor in tensors)
    check_free_space(options.output_dir, total)
    tokenizer_dir = options.adapter_dir if (options.adapter_dir / "tokenizer.json").is_file() else settings.base_dir
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(options.adapter_dir.resolve().name)
    add_hyper_parameters(writer, base.config, GGUF_TYPES[gguf_type][1])
    add_tokenizer(writer, tokenizer_dir, base.config["model_type"], base.config["vocab_size"])
    with staged_output(options.output_dir) as partial:
        merger = Merger(TensorSource(), adapter, settings, options, device)
        write_gguf(partial / gguf_file_name(gguf_type), writer, tensors, merger)
        (partial / "Modelfile").write_text(f"FROM ./{gguf_file_name(gguf_type)}\n")  # ollama create NAME -f Modelfile
    seconds = time.perf_counter() - started
    logger.info(f"wrote {options.output_dir / gguf_file_name(gguf_type)}: {len(adapter.lora_modules)} LoRA modules "
                f"merged, {len(tensors)} tensors, {total / 1e9:.2f} GB, {seconds:.1f} s on {device.type}")
    return MergeResult(options.output_dir, seconds, total, 1, len(adapter.lora_modules), base.largest_tensor_bytes,
                       device.type)
