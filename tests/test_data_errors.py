"""Bad data: a one-line error naming the problem, or a counted skip that --strict turns into an error."""

import json
import subprocess
import sys

import pytest
from datasets import Dataset

from cli import run_main
from qlora_kit.config import DataArguments
from qlora_kit.data.dataset import build_datasets
from qlora_kit.errors import UserError
from qlora_kit.recipes.chat import main as recipe_main

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good_lines(n):
    return [json.dumps(GOOD)] * n


def build(tokenizer, tmp_path, path, **fields):
    args = DataArguments(dataset_name=str(path), eval_fraction=0.0, **fields)
    return build_datasets(args, tokenizer, seed=0, cache_dir=tmp_path / "cache")


def one_line_error(tokenizer, tmp_path, path, **fields) -> str:
    with pytest.raises(UserError) as caught:
        build(tokenizer, tmp_path, path, **fields)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- errors: the file or the source as a whole ------------------------------------------------

def test_a_line_that_is_not_json(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", good_lines(3) + ['{"messages": [oops'] + good_lines(2))
    message = one_line_error(demo_tokenizer, tmp_path, path)
    assert f"{path} line 4 is not JSON" in message and "the 3 lines before it were fine" in message


def test_a_truncated_json_file(demo_tokenizer, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([GOOD] * 5)[:-25])
    message = one_line_error(demo_tokenizer, tmp_path, path)
    assert f"{path} is not valid JSON" in message and "cut short" in message


def test_a_file_that_is_not_utf8(demo_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    message = one_line_error(demo_tokenizer, tmp_path, path)
    assert f"{path} is not UTF-8 text (byte 0xe9 on line 2)" in message


def test_an_empty_file(demo_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("")
    assert f"{path} is empty" in one_line_error(demo_tokenizer, tmp_path, path)


def test_a_path_that_does_not_exist(demo_tokenizer, tmp_path):
    message = one_line_error(demo_tokenizer, tmp_path, tmp_path / "nowhere" / "chats.jsonl")
    assert "does not exist" in message and "chatterbot-en" in message


def test_a_hub_id_that_cannot_be_reached(demo_tokenizer, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line_error(demo_tokenizer, tmp_path, "someorg/some-chats")
    assert "dataset someorg/some-chats is not a local path and could not be loaded from the hub" in message


def test_columns_that_fit_no_format(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    message = one_line_error(demo_tokenizer, tmp_path, path)
    assert "cannot tell the format" in message and "answer, question" in message and "--dataset_format" in message


def test_a_forced_format_whose_columns_are_missing(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", good_lines(2))
    message = one_line_error(demo_tokenizer, tmp_path, path, dataset_format="alpaca")
    assert "has no 'instruction', 'output' column, which the alpaca format needs" in message


@pytest.mark.parametrize("records, expected", [
    ([{"messages": "Hi there"}] * 3, "column 'messages' of {path} holds string values; it must be a list of {{role, content}} objects"),
    ([{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": 8}]}] * 2,
     "column 'messages.content' of {path} holds int64 values; it must be text"),
    ([{"instruction": "Add.", "output": 5}] * 2, "column 'output' of {path} holds int64 values; it must be text"),
])
def test_a_column_of_the_wrong_type(demo_tokenizer, tmp_path, records, expected):
    path = tmp_path / "c.parquet"
    Dataset.from_list(records).to_parquet(str(path))
    assert expected.format(path=path) in one_line_error(demo_tokenizer, tmp_path, path)


def test_a_dataset_empty_after_filtering(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": [{"role": "user", "content": "Hi"}]})] * 4)
    message = one_line_error(demo_tokenizer, tmp_path, path)
    assert "has no usable example after filtering (dropped: 4 no assistant turn)" in message


def test_every_conversation_longer_than_max_seq_length_with_the_drop_policy(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", good_lines(3))
    message = one_line_error(demo_tokenizer, tmp_path, path, max_seq_length=8, truncation_policy="drop")
    assert "has no usable example after filtering (dropped: 3 longer than max_seq_length" in message


def test_bad_weights(demo_tokenizer, tmp_path):
    path = write_lines(tmp_path / "c.jsonl", good_lines(2))
    assert "give every source a weight" in one_line_error(demo_tokenizer, tmp_path, f"{path}:0.5,{path}")
    assert "must be a positive number" in one_line_error(demo_tokenizer, tmp_path, f"{path}:-1")


@pytest.mark.parametrize("spec", ["{path}:0.5,{path}:abc", "{path}:abc"])
def test_a_weight_that_is_not_a_number_is_named(demo_tokenizer, tmp_path, spec):
    path = write_lines(tmp_path / "c.jsonl", good_lines(2))
    message = one_line_error(demo_tokenizer, tmp_path, spec.format(path=path))
    assert f"the weight of {path} is 'abc', which is not a number" in message
    assert "give every source a weight" not in message and "does not exist" not in message


# --- skips: one bad record among good ones ------------------------------------------------------

SKIPS = [
    ({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]},
     "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "Anyone?"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "Hm?"}]},
     "a message with empty content"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "Hm?"}]},
     "a message without content"),
    ({"messages": None}, "missing 'messages'"),
    ({"messages": "not a list"}, "'messages' is not a list of objects"),
    ({"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "Hm?"}]},
     "a message whose content is not text"),
]


@pytest.mark.parametrize("bad, reason", SKIPS)
def test_a_bad_record_is_skipped_and_counted_or_an_error_with_strict(demo_tokenizer, tmp_path, bad, reason):
    path = write_lines(tmp_path / "c.jsonl", good_lines(5) + [json.dumps(bad)] + good_lines(2))
    train, _, report = build(demo_tokenizer, tmp_path, path)
    assert len(train) == 7 and report.dropped == {reason: 1}
    message = one_line_error(demo_tokenizer, tmp_path, path, strict=True)
    assert f"{path} record 6: {reason}" in message and "--strict" in message


def test_a_record_missing_a_field_of_its_format(demo_tokenizer, tmp_path):
    records = [{"instruction": "Say hi.", "output": "Hi."}] * 3 + [{"instruction": "Say bye.", "output": None}]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in records])
    assert build(demo_tokenizer, tmp_path, path)[2].dropped == {"missing 'output'": 1}
    assert "record 4: missing 'output'" in one_line_error(demo_tokenizer, tmp_path, path, strict=True)


def test_one_long_conversation_with_the_drop_policy_is_dropped_and_counted(demo_tokenizer, tmp_path):
    long = {"messages": [{"role": "user", "content": "A story?"}, {"role": "assistant", "content": "word " * 300}]}
    path = write_lines(tmp_path / "c.jsonl", good_lines(4) + [json.dumps(long)])
    train, _, report = build(demo_tokenizer, tmp_path, path, max_seq_length=64, truncation_policy="drop", strict=True)
    assert len(train) == 4 and report.dropped == {"longer than max_seq_length (--truncation_policy drop)": 1}
    train, _, report = build(demo_tokenizer, tmp_path, path, max_seq_length=64)  # the default keeps it, cut
    assert len(train) == 5 and report.truncated == 1 and report.dropped == {}


# --- the command line: one line on stderr, exit code 2, nothing written ---------------------------

def test_the_recipe_reports_bad_data_in_one_line(tmp_path, demo_model_dir, capsys):
    bad = json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    path, out = write_lines(tmp_path / "c.jsonl", good_lines(2) + [bad]), tmp_path / "out"
    result = run_main(recipe_main, capsys, "--dataset_name", str(path), "--strict", "true", "--output_dir", str(out),
                      cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "record 3: unknown role 'bot'" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


# --- a huge record: dropped or cut without tokenizing all of it ------------------------------------

HUGE_RECORD_CHILD = """
import json, resource, sys
from pathlib import Path
from qlora_kit.config import DataArguments
from qlora_kit.data.dataset import build_datasets
from qlora_kit.model.tokenizer import load_tokenizer
folder, model_dir, huge_chars = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
rows = [good] * 6
if huge_chars:
    huge = {"messages": [{"role": "user", "content": "Summarise: " + "word " * (huge_chars // 5)},
                         {"role": "assistant", "content": "Done."}]}
    rows.insert(3, huge)
path = folder / f"chats-{huge_chars}.jsonl"
path.write_text("".join(json.dumps(row) + "\\n" for row in rows))
args = DataArguments(dataset_name=str(path), eval_fraction=0.0, max_seq_length=256, truncation_policy="drop")
_, _, report = build_datasets(args, load_tokenizer(Path(model_dir)), 0, cache_dir=folder / "cache")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "kept": report.examples_kept, "dropped": report.dropped, "line": report.line()}))
"""


def data_stage_peak(tmp_path, model_dir, huge_chars: int) -> dict:
    result = subprocess.run([sys.executable, "-c", HUGE_RECORD_CHILD, str(tmp_path), str(model_dir), str(huge_chars)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_huge_record_is_dropped_without_tokenizing_all_of_it(tmp_path, demo_model_dir):
    # One 20 MB record took 2.8 GB more memory (and 80 s) before it was dropped: all of it was tokenized.
    without = data_stage_peak(tmp_path, demo_model_dir, 0)
    huge = data_stage_peak(tmp_path, demo_model_dir, 20_000_000)
    assert huge["kept"] == without["kept"] == 6
    assert huge["dropped"] == {"longer than max_seq_length (--truncation_policy drop)": 1}
    assert "1 records far longer than max_seq_length tokenized only up to what could be kept" in huge["line"]
    assert huge["peak_mib"] - without["peak_mib"] < 600, (huge["peak_mib"], without["peak_mib"])


@pytest.mark.parametrize("fmt", ["messages", "text"])
@pytest.mark.parametrize("policy", ["whole_turns", "cut", "drop"])
def test_a_long_record_gives_the_same_tokens_as_when_tokenized_whole(demo_tokenizer, monkeypatch, fmt, policy):
    from qlora_kit.data import tokenize

    words = " ".join(f"w{i % 997}x{i % 13}" for i in range(40_000))  # ~300k characters, far above 8 per token
    if fmt == "text":
        batch = {"text": [words, "Short text."]}
    else:
        turns = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": words}, {"role": "assistant", "content": "Done."}],
                 [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": words}]]
        batch = {"messages": turns}
    settings = tokenize.TokenizeSettings(max_seq_length=200, truncation=policy)
    early = tokenize.tokenize_batch(batch, fmt=fmt, tokenizer=demo_tokenizer, settings=settings)
    monkeypatch.setattr(tokenize, "PREFIX_CHARS_PER_TOKEN", 10**9)  # every text tokenized whole, as before
    whole = tokenize.tokenize_batch(batch, fmt=fmt, tokenizer=demo_tokenizer, settings=settings)
    assert early["prefix_only"][0] and not any(whole["prefix_only"])
    assert {k: v for k, v in early.items() if k != "prefix_only"} == {k: v for k, v in whole.items() if k != "prefix_only"}
