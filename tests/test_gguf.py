"""A .gguf path trains through the recipe and exports: converted once per file content, its chat template
kept (or ChatML, said), and a GGUF transformers cannot read refused in one line."""

import json

import gguf
import pytest
import yaml

from qlora_kit.config import parse
from qlora_kit.errors import UserError
from qlora_kit.export.cli import main as export_main
from qlora_kit.model.tokenizer import load_tokenizer
from qlora_kit.recipes.chat import run
from qlora_kit.sources import resolve_model
from tiny_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path_factory.getbasetemp() / "gguf-cache"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_gguf_file_trains_through_the_recipe_and_exports(tiny_gguf, tmp_path):
    out = tmp_path / "run"
    run(parse(["--model_name_or_path", str(tiny_gguf), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--max_seq_length", "64", "--eval_fraction", "0",
               "--save_steps", "0", "--logging_steps", "1"]))
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())["resolved"]
    assert resolved["base_model_dir"] == str(resolve_model(str(tiny_gguf)))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    export_main(["--adapter_dir", str(out), "--output_dir", str(tmp_path / "merged"), "--base_model", str(tiny_gguf)])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2


def test_converted_once_per_file_content(tiny_gguf, tmp_path, said):
    folder = resolve_model(str(tiny_gguf))  # converts it, or finds the folder an earlier test converted
    said.clear()
    assert resolve_model(str(tiny_gguf)) == folder  # the cached folder: no conversion
    assert not any("converting" in r.getMessage() for r in said)
    other = write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)  # another file of the same name
    assert resolve_model(str(other)) != folder
    assert "<|im_start|>" in load_tokenizer(folder).chat_template  # the GGUF's own template


def test_a_gguf_without_a_chat_template_gets_chatml_and_says_so(tmp_path, said):
    path = write_tiny_gguf(tmp_path / "bare.gguf", chat_template=False, seed=2)
    folder = resolve_model(str(path))
    assert any("holds no chat template: its HF folder gets ChatML" in r.getMessage() for r in said)
    assert load_tokenizer(folder).chat_template.startswith("{%")


@pytest.mark.parametrize("variant, message", [
    ({"architecture": "rwkv6"}, "holds a rwkv6 model, which transformers' GGUF loader does not read"),
    ({"quant_type": gguf.GGMLQuantizationType.Q8_1}, "Dequantization for Q8_1 is not yet implemented"),
])
def test_a_gguf_transformers_cannot_read_is_one_line(tmp_path, variant, message):
    path = write_tiny_gguf(tmp_path / "odd.gguf", **variant)
    with pytest.raises(UserError, match=message) as error:
        resolve_model(str(path))
    assert "\n" not in str(error.value)
