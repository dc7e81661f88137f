"""The base model's fingerprint: other weights are told apart, the same model moved is not, 140 GB costs little."""

import json
import os
import shutil
import struct
import time

import torch
from safetensors.torch import load_file, save_file

from qlora_kit.fingerprint import compare, config_fingerprint, model_fingerprint
from tiny_models import save_tiny_model


def test_same_config_other_weights_differ_and_a_moved_copy_matches(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0)
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert (base / "config.json").read_bytes() == (other / "config.json").read_bytes()
    moved = shutil.copytree(base, tmp_path / "elsewhere" / "base")  # new paths, new modification times
    os.utime(moved / "model.safetensors", (1, 1))
    assert model_fingerprint(moved) == model_fingerprint(base)
    assert compare(model_fingerprint(base), model_fingerprint(other)) == "weights differ"


def test_one_changed_tensor_is_seen(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 1.5
    changed = shutil.copytree(base, tmp_path / "changed")
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert compare(model_fingerprint(base), model_fingerprint(changed)) == "weights differ"


def test_a_config_only_record_of_an_older_run_is_told_apart(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0)
    other = save_tiny_model(tmp_path / "other", seed=1)
    wider = save_tiny_model(tmp_path / "wider", intermediate_size=96)
    legacy = config_fingerprint(base)  # what run_config.yaml recorded before the weights were covered
    assert compare(legacy, model_fingerprint(other)) == "weights unchecked"
    assert compare(legacy, model_fingerprint(wider)) == "config differs"
    assert compare(model_fingerprint(base), model_fingerprint(wider)) == "config differs"


def _sparse_safetensors(path, total_bytes, first_value):
    """A safetensors file of `total_bytes` whose bytes are holes except one value at the start of its data."""
    count = 4
    per_tensor = (total_bytes // count) // 2 * 2
    header = {f"t{i}": {"dtype": "BF16", "shape": [per_tensor // 2],
                        "data_offsets": [i * per_tensor, (i + 1) * per_tensor]} for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw + bytes([first_value, 0]))
        handle.truncate(8 + len(raw) + count * per_tensor)


def test_140_gb_of_weights_cost_milliseconds(tmp_path):
    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        _sparse_safetensors(tmp_path / name / "model.safetensors", 140 * 10**9, value)
        with open(tmp_path / name / "model.gguf", "wb") as handle:  # GGUF: size and sampled bytes
            handle.truncate(10**9)
    started = time.perf_counter()
    a, b = model_fingerprint(tmp_path / "a"), model_fingerprint(tmp_path / "b")
    assert time.perf_counter() - started < 2.0  # reading 140 GB would take minutes
    assert compare(a, b) == "weights differ"


def test_gguf_weights_are_sampled(tmp_path):
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        generator = torch.Generator().manual_seed(seed)
        payload = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        (folder / "model.gguf").write_bytes(b"GGUF" + payload)
    a, b, c = (model_fingerprint(tmp_path / name) for name in "abc")
    assert a == c and compare(a, b) == "weights differ"
