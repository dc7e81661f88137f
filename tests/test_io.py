"""The I/O layer: folders written atomically, and the safetensors header reader's refusals."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from qlora_kit.errors import UserError
from qlora_kit.io.atomic import atomic_folder
from qlora_kit.io.safetensors import MAX_HEADER_BYTES, HeaderError, model_key, read_header, read_tensors, shard_files
from qlora_kit.sources import check_model_folder


def test_atomic_folder_replaces_the_target_when_the_body_finishes(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as folder:
        (folder / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_leaves_nothing_and_the_old_folder_intact_when_the_body_raises(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as folder:
            (folder / "half.txt").write_text("half")
            raise RuntimeError("stopped half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "old.txt").read_text() == "old" and not (target / "half.txt").exists()


def test_atomic_folder_creates_no_folder_when_the_body_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _model_folder(tmp_path, weights: bytes):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def _refusal(folder) -> str:
    """What the header reader and the model-folder check say about the folder's model.safetensors."""
    with pytest.raises(HeaderError):
        read_header(folder / "model.safetensors")
    with pytest.raises(UserError) as error:
        check_model_folder(folder, "FIX")
    return str(error.value)


@pytest.mark.parametrize("weights", [
    b"\x01\x02",  # shorter than the length prefix
    struct.pack("<Q", 0) + b"{}",
    struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{}",  # longer than safetensors allows
    struct.pack("<Q", 1000) + b"{}",  # past the end of the file
])
def test_an_oversized_header_is_refused_as_before(tmp_path, weights):
    folder = _model_folder(tmp_path, weights)
    file = folder / "model.safetensors"
    assert _refusal(folder) == f"model file {file} is truncated or not a safetensors file ({len(weights):,} bytes); FIX"


@pytest.mark.parametrize("header", [b"{not json", b'{"t": {"dtype": "F32"}}', b'[1, 2]', b'"text"'])
def test_a_garbled_header_is_refused_as_before(tmp_path, header):
    folder = _model_folder(tmp_path, struct.pack("<Q", len(header)) + header)
    assert _refusal(folder) == f"model file {folder / 'model.safetensors'} has a damaged header; FIX"


def test_the_header_and_the_tensors_read_back(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(4, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "model.safetensors")
    assert set(header.entries) == {"a", "b"} and header.file_size == (tmp_path / "model.safetensors").stat().st_size
    read = dict(read_tensors(tmp_path / "model.safetensors"))
    assert all(torch.equal(read[name], tensors[name]) for name in tensors)


def test_shard_files_follow_the_index_else_the_pattern(tmp_path):
    for name in ("model.safetensors", "extra.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert shard_files(tmp_path) == [tmp_path / "extra.safetensors", tmp_path / "model.safetensors"]
    assert shard_files(tmp_path, "model.safetensors") == [tmp_path / "model.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}))
    assert shard_files(tmp_path) == [tmp_path / "b.safetensors", tmp_path / "a.safetensors"]


def test_checkpoint_keys_map_with_or_without_the_model_prefix():
    names = {"model.layers.0.weight", "lm_head.weight"}
    assert model_key("layers.0.weight", names, "model") == "model.layers.0.weight"
    assert model_key("model.lm_head.weight", names, "model") == "lm_head.weight"
    assert model_key("lm_head.weight", names, "") == "lm_head.weight"
    assert model_key("other", names, "model") is None
