"""GGUF export of the demo model: read back by transformers, it computes and tokenizes as the merged model does.

transformers' GGUF loader parses every token and merge of the file in Python (tens of seconds on the
demo's 49k vocabulary), so each file is read back once, and the tokenizer once.
"""

import gguf
import pytest
import torch

from export_runs import adapt_and_save, make_run
from qlora_kit.export.cli import main as export_main
from qlora_kit.export.gguf import gguf_file_name
from qlora_kit.bench.gguf_check import compare_with_merged, llama_cpp_check

pytestmark = pytest.mark.slow
GGUF_TYPES = ["f16", "q8_0"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_model_dir, demo_tokenizer):
    """A run on the demo model with a trained-looking adapter, its float32 merged model, and its GGUF files.

    Merged into the original weights (not the NF4 ones): what is checked here is the file, not the merge.
    """
    folder = tmp_path_factory.mktemp("gguf-demo")
    _, run, _ = adapt_and_save(demo_model_dir, folder / "run", torch.float32, demo_tokenizer, scale=0.01)
    common = ["--adapter_dir", str(run), "--merge_base", "original"]
    export_main(common + ["--output_dir", str(folder / "merged"), "--dtype", "float32"])
    files = {}
    for gguf_type in GGUF_TYPES:
        export_main(common + ["--output_dir", str(folder / gguf_type), "--format", "gguf", "--gguf_type", gguf_type])
        files[gguf_type] = folder / gguf_type / gguf_file_name(gguf_type)
    return folder / "merged", files


def test_the_f16_gguf_computes_and_tokenizes_as_the_merged_model(demo_run):
    merged, files = demo_run
    report = compare_with_merged(files["f16"], merged, "f16")
    assert report["within_floor"], report
    assert report["gguf_vs_merged"]["positions"] > 100 and report["gguf_vs_merged"]["top1_agreement"] > 0.97
    assert report["tokenizer"]["identical"] == report["tokenizer"]["strings"] == 4


def test_the_q8_0_gguf_stays_within_its_own_floor(demo_run):
    merged, files = demo_run
    report = compare_with_merged(files["q8_0"], merged, "q8_0", check_tokenizer=False)
    assert report["within_floor"], report
    assert report["gguf_vs_merged"]["top1_agreement"] > 0.9
    fields = gguf.GGUFReader(files["q8_0"]).fields  # what llama.cpp needs beside the tensors
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert (files["q8_0"].parent / "Modelfile").read_text() == "FROM ./model-q8_0.gguf\n"
    assert not list(files["q8_0"].parent.parent.glob(".*partial*"))


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_llama_cpp_runs_the_gguf(demo_run, gguf_type):
    pytest.importorskip("llama_cpp")
    merged, files = demo_run
    report = llama_cpp_check(files[gguf_type], merged)
    assert report["top1_agreement"] > 0.9 and report["chats_tokenized_alike"] == report["chats"]
    assert report["greedy_reply"].strip()


def test_a_family_the_exporter_does_not_know_is_refused_before_writing(tmp_path, capsys):
    _, run, _ = make_run(tmp_path, "phi3")
    out = tmp_path / "gguf"
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--adapter_dir", str(run), "--output_dir", str(out), "--format", "gguf"])
    assert exit_info.value.code == 2 and not out.exists()
    assert "GGUF export supports the llama, mistral, qwen2 families; this model is phi3" in capsys.readouterr().err


def test_the_recipe_export_writes_the_gguf_beside_the_run(tmp_path, demo_tokenizer):
    from qlora_kit.config import ExportArguments
    from qlora_kit.export.cli import export_run

    _, run, _ = make_run(tmp_path, "qwen2", tokenizer=demo_tokenizer, model_overrides={"vocab_size": 49152})
    (result,) = export_run(run, ExportArguments(export_gguf="bf16"))
    assert result.output_dir == run / "gguf" and not (run / "merged").exists()
    assert (run / "gguf" / gguf_file_name("bf16")).read_bytes()[:4] == b"GGUF"
