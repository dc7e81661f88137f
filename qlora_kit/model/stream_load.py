"""The streaming quantized loader: models bigger than host RAM or GPU memory, one tensor at a time.

`load_quantized_model` (load.py) goes through transformers' `from_pretrained`, which has no way
to say "keep these decoder layers, packed in NF4, in pinned host RAM". This loader builds the
model on the meta device (parameters only: buffers such as the rotary frequencies are real and
small), swaps its projections for bitsandbytes `Linear4bit` with transformers' own
`replace_with_bnb_linear` and the same list of modules kept unquantized (quantized.py), then reads
the checkpoint's safetensors shards one tensor at a time (`qlora_kit.io.safetensors.read_tensors`).
Each tensor is cast to the compute dtype and, for a projection, quantized with the very call
transformers' bnb quantizer makes (`Params4bit(value, **meta_param.__dict__).to(device)`: NF4,
double quantization, on the GPU when there is one), so the packed weights, the quantization
states and the logits are the same as the normal loader's. It is then placed: on the device, or, for the decoder layers that stream
(`qlora_kit.memory.stream`), in host RAM, where the streamer packs each layer into one pinned
block (pinning each tensor here would round every one up to a power of two and, with the
streamer's copy, hold the layers twice). The bf16 model is never materialised: peak host RAM is
the placed model plus the tensor being read.

With `--quantized_cache DIR` the placed tensors are also written to DIR (see quant_cache.py),
and later runs read them from there instead of reading and quantizing the checkpoint again.

Checkpoints whose tensor names are the model's parameter names load this way (Llama, Mistral,
Qwen, Gemma, Phi-3, GPT-2 and the like); ones that transformers renames or fuses while loading
(e.g. Mixtral's experts) are refused with a message pointing to the normal loader.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import bitsandbytes as bnb
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from qlora_kit.config import ModelArguments, StreamArguments
from qlora_kit.errors import UserError
from qlora_kit.io.safetensors import model_key, read_checkpoint, shard_files
from qlora_kit.log import notice_once
from qlora_kit.model.bnb_cpu import keep_canonical_layout
from qlora_kit.model.family import attention_for
from qlora_kit.model.load import load_quantized_model, quantization_config
from qlora_kit.model.quantized import replace_quantized_linears
from qlora_kit.model.targets import find_decoder_blocks

HOST = torch.device("cpu")
try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


def streamed_layer_indices(num_layers: int, resident_layers: int) -> list[int]:
    """Which decoder layers stream when `resident_layers` stay on the GPU (-1: all stay).

    The streamed layers are spread evenly between the resident ones, so the copy of a streamed
    layer overlaps the compute of the resident layers before it.
    """
    if resident_layers < 0 or resident_layers >= num_layers:
        return []
    streamed = num_layers - resident_layers
    return sorted({min(num_layers - 1, (2 * k + 1) * num_layers // (2 * streamed)) for k in range(streamed)})


@dataclass
class Placement:
    """Where each tensor goes: the device, except the quantized weights of the streamed layers."""

    device: torch.device
    blocks_path: str
    streamed: set[int] = field(default_factory=set)

    def layer_of(self, name: str) -> Optional[int]:
        prefix = self.blocks_path + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def host_for(self, name: str) -> bool:
        """True for the tensors of a streamed layer (its quantized weights wait in host RAM)."""
        return self.layer_of(name) in self.streamed


def build_empty_model(
    config: PretrainedConfig, args: ModelArguments, compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8
) -> PreTrainedModel:
    """The model on the meta device with its projections already `Linear4bit`, as transformers makes them."""
    bnb_config = quantization_config(args, compute_dtype, quant_storage)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=compute_dtype, trust_remote_code=args.trust_remote_code,
            attn_implementation=attention_for(config, args.attn_implementation),
        )
    model.hf_quantizer = replace_quantized_linears(model, bnb_config)
    model.is_loaded_in_4bit = True
    model.config.quantization_config = bnb_config
    return keep_canonical_layout(model)


def move_quantized(param: bnb.nn.Params4bit, device: torch.device) -> None:
    """Move a packed NF4 weight and every tensor of its quantization state, in place."""
    param.data = param.data.to(device)
    param.quant_state.to(device)


class TensorPlacer:
    """Puts checkpoint tensors into a meta model: cast, quantize the projections, place."""

    def __init__(self, model: PreTrainedModel, placement: Placement, compute_dtype: torch.dtype):
        self.model = model
        self.placement = placement
        self.compute_dtype = compute_dtype
        self.expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        self.expected |= {name for name, buffer in model.named_buffers() if buffer.device.type == "meta"}
        self.modules = dict(model.named_modules())  # as built: LoRA wrappers added later do not hide the 4-bit layers
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.fp32_modules = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.quantize_device = placement.device  # on the GPU when there is one, as transformers does

    def resolve(self, key: str) -> Optional[str]:
        """The model's name for a checkpoint key (with or without the base model's prefix)."""
        return model_key(key, self.expected, self.prefix)

    def put(self, key: str, value: torch.Tensor) -> Optional[str]:
        """Place one checkpoint tensor; return the parameter name it became (None: not the model's)."""
        name = self.resolve(key)
        if name is None:
            self.unexpected.append(key)
            return None
        module_name, _, attr = name.rpartition(".")
        module = self.modules[module_name]
        if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
            new = self._quantize(module, value)
            if self.placement.host_for(name):
                move_quantized(new, HOST)
            module._parameters["weight"] = new
        else:  # norms, biases, embeddings, lm_head: small or shared, so always on the device
            dtype = torch.float32 if self._keep_fp32(name) else self.compute_dtype
            tensor = value.to(device=self.placement.device, dtype=dtype if value.is_floating_point() else value.dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        self.loaded.add(name)
        release_freed_memory()
        return name

    def put_quantized(self, key: str, data: torch.Tensor, stats: dict[str, torch.Tensor]) -> str:
        """Place an already quantized weight (packed data and its serialized quantization state)."""
        name = self.resolve(key)
        module = self.modules[name.rpartition(".")[0]] if name else None
        if not isinstance(module, bnb.nn.Linear4bit):
            raise UserError(f"the quantized cache holds {key}, which is no 4-bit projection of this model; "
                            f"delete the cache or name another folder")
        host = self.placement.host_for(name)
        param = bnb.nn.Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=HOST if host else self.placement.device, module=module
        )
        module._parameters["weight"] = param
        self.loaded.add(name)
        return name

    def _keep_fp32(self, name: str) -> bool:
        return any(f".{part}." in f".{name}." for part in self.fp32_modules)

    def _quantize(self, module: bnb.nn.Linear4bit, value: torch.Tensor) -> bnb.nn.Params4bit:
        source_cls = getattr(module, "source_cls", None)
        if source_cls is not None and source_cls.__name__ == "Conv1D":
            value = value.T  # GPT-2 style Conv1D stores the weight transposed, as transformers handles it
        value = value.to(device=self.quantize_device, dtype=self.compute_dtype)
        old = module.weight
        return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)

    def finish(self) -> PreTrainedModel:
        """Tie shared weights, move the real buffers to the device, refuse anything left unloaded."""
        model = self.model
        model.tie_weights()
        if self.unexpected:
            notice_once(f"the checkpoint holds {len(self.unexpected)} tensor(s) the model does not use "
                        f"(e.g. {self.unexpected[0]}); they were skipped")
        missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        missing += [name for name, b in model.named_buffers() if b.device.type == "meta"]
        if missing:
            raise UserError(
                f"the streaming loader found no tensor for {len(missing)} parameter(s) of the model, e.g. "
                f"{', '.join(missing[:3])}: this checkpoint's names differ from the model's; load it without "
                f"--resident_layers and --quantized_cache (the normal loader renames them)"
            )
        for module in model.modules():
            for attr, buffer in module._buffers.items():
                if buffer is not None and buffer.device != self.placement.device:
                    module._buffers[attr] = buffer.to(self.placement.device)
        model.requires_grad_(False)
        model.config.use_cache = False
        return model.eval()


def checkpoint_shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in the index's order when there is one."""
    files = shard_files(model_dir)
    if not files:
        raise UserError(f"{model_dir} holds no .safetensors file; the streaming loader reads only safetensors")
    return files


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps the quantizer's temporaries otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def load_streaming(
    model_dir: Path,
    args: ModelArguments,
    compute_dtype: torch.dtype,
    device: torch.device,
    resident_layers: int = -1,
    quantized_cache: Optional[str] = None,
) -> PreTrainedModel:
    """Load a causal LM tensor by tensor into NF4, the streamed layers' weights in host RAM.

    Args:
        model_dir: a transformers model folder with safetensors weights.
        args: the model fields (quantization switches, attention, remote code).
        compute_dtype: dtype of the matmuls and of the unquantized tensors.
        device: where everything not streamed goes (and where the projections are quantized).
        resident_layers: decoder layers kept on the device; -1 keeps all.
        quantized_cache: a folder to read the quantized model from, or to write it to on a first run.
    """
    from qlora_kit.model import quant_cache

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    model = build_empty_model(config, args, compute_dtype)
    blocks_path, blocks = find_decoder_blocks(model)
    placement = Placement(device, blocks_path, set(streamed_layer_indices(len(blocks), resident_layers)))
    placer = TensorPlacer(model, placement, compute_dtype)
    if quantized_cache is None:
        for key, value in read_checkpoint(checkpoint_shards(model_dir)):
            placer.put(key, value)
        return placer.finish()
    cache = quant_cache.QuantizedCache(Path(quantized_cache), model_dir, args, compute_dtype)
    if cache.ready():
        cache.load_into(placer)
        return placer.finish()
    with cache.writer() as writer:
        for key, value in read_checkpoint(checkpoint_shards(model_dir)):
            name = placer.put(key, value)
            if name is not None:
                writer.add(name, placer.model, placement.layer_of(name))
    return placer.finish()


def load_model(model_dir: Path, args: ModelArguments, stream: StreamArguments, compute_dtype: torch.dtype,
               device: torch.device) -> PreTrainedModel:
    """The normal loader, or the streaming one when layers stream or a quantized cache is named."""
    if stream.resident_layers < 0 and stream.quantized_cache is None:
        return load_quantized_model(model_dir, args, compute_dtype, device)
    return load_streaming(model_dir, args, compute_dtype, device, stream.resident_layers, stream.quantized_cache)
