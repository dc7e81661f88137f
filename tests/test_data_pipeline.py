"""The data stage end to end: sources, formats, the cache, the eval split, mixing, packing and the report."""

import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

import qlora_kit.data.dataset as data_stage
from qlora_kit.config import DataArguments, parse
from qlora_kit.data.dataset import build_datasets
from qlora_kit.data.formats import detect_format, to_messages
from qlora_kit.bench.synthetic_data import synthetic_conversations
from qlora_kit.data.tokenize import IGNORE_INDEX


def chats(n, tag="chat", start=0):
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"{tag} answer {i}."}]} for i in range(start, start + n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build(tokenizer, tmp_path, **fields):
    fields.setdefault("eval_fraction", 0.0)
    return build_datasets(DataArguments(**fields), tokenizer, seed=0, cache_dir=tmp_path / "cache")


def decoded_users(tokenizer, dataset):
    return [tokenizer.decode(ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for ids in dataset["input_ids"]]


@pytest.mark.parametrize("record, expected_format, expected", [
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                   {"role": "assistant", "content": "A"}]}, "messages",
     [("system", "S"), ("user", "U"), ("assistant", "A")]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                        {"from": "gpt", "value": "A"}]}, "sharegpt",
     [("system", "S"), ("user", "U"), ("assistant", "A")]),
    ({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca",
     [("user", "Translate.\n\nchat"), ("assistant", "cat")]),
    ({"instruction": "Say hi.", "input": "", "output": "Hi."}, "alpaca", [("user", "Say hi."), ("assistant", "Hi.")]),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", [("user", "2+2="), ("assistant", "4")]),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
     "prompt_completion", [("user", "Hi"), ("assistant", "Yo")]),
    ({"text": "Plain prose."}, "text", [("text", "Plain prose.")]),
])
def test_every_format_is_detected_and_becomes_messages(record, expected_format, expected):
    features = Dataset.from_list([record]).features
    assert detect_format(features, "x") == expected_format
    assert [(m["role"], m["content"]) for m in to_messages(record, expected_format)] == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_each_file_type_reads_the_same(demo_tokenizer, tmp_path, suffix):
    records = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(6)]
    path, dataset = tmp_path / f"data{suffix}", Dataset.from_list(records)
    if suffix == ".jsonl":
        write_jsonl(path, records)
    elif suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif suffix == ".parquet":
        dataset.to_parquet(str(path))
    else:
        dataset.to_csv(str(path), index=False)
    train, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(path))
    assert report.sources[0]["format"] == "alpaca" and len(train) == 6
    assert sorted(decoded_users(demo_tokenizer, train)) == sorted(r["instruction"] for r in records)


def test_folder_of_files_and_save_to_disk_folders(demo_tokenizer, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", chats(3, "a"))
    Dataset.from_list(chats(2, "b")).to_parquet(str(folder / "b.parquet"))
    train, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(folder))
    assert len(train) == 5 and report.examples_read == 5
    Dataset.from_list(chats(4, "saved")).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(chats(3, "dict")), "test": Dataset.from_list(chats(1))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    assert len(build(demo_tokenizer, tmp_path, dataset_name=str(tmp_path / "saved"))[0]) == 4
    train, _, _ = build(demo_tokenizer, tmp_path, dataset_name=str(tmp_path / "saved_dict"))
    assert sorted(decoded_users(demo_tokenizer, train)) == [f"dict question {i}?" for i in range(3)]


def test_the_format_can_be_forced(demo_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Some prose here.", "messages": None}] * 3)
    train, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(path), dataset_format="text")
    assert report.sources[0]["format"] == "text"
    assert train[0]["labels"] == train[0]["input_ids"]


def test_a_second_run_reads_the_tokenized_data_from_the_cache(demo_tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", chats(40))
    first, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(path))
    assert not report.tokenized_from_cache

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_stage, "tokenize_batch", must_not_run)
    again, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(path))
    assert report.tokenized_from_cache and again["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings do tokenize again
        build(demo_tokenizer, tmp_path, dataset_name=str(path), max_seq_length=100)
    write_jsonl(path, chats(41))  # so does changed data
    with pytest.raises(AssertionError, match="tokenized again"):
        build(demo_tokenizer, tmp_path, dataset_name=str(path))


def test_the_report_counts_what_was_read_kept_dropped_and_trained(demo_tokenizer, tmp_path):
    records = chats(8) + [{"messages": [{"role": "user", "content": "alone"}]},
                          {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    train, eval_data, report = build(demo_tokenizer, tmp_path, dataset_name=str(path), eval_fraction=0.25)
    assert (report.examples_read, report.examples_kept) == (10, 8)
    assert report.dropped == {"no assistant turn": 1, "unknown role 'robot'": 1}
    assert (report.train_examples, report.eval_examples) == (len(train), len(eval_data)) == (6, 2)
    lengths = [len(ids) for ids in train["input_ids"]]
    assert report.tokens == sum(lengths)
    assert report.trained_tokens == sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in train["labels"])
    assert report.length == {"min": min(lengths), "median": int(np.median(lengths)),
                             "p95": int(np.percentile(lengths, 95)), "max": max(lengths)}
    assert 0 < report.trained_share < 1 and "10 examples read, 8 kept" in report.line()


def test_eval_data_from_its_own_source(demo_tokenizer, tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", chats(10, "train"))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", chats(3, "eval"))
    train, eval_data, report = build(demo_tokenizer, tmp_path, dataset_name=str(train_path),
                                     eval_dataset_name=str(eval_path), eval_fraction=0.5)
    assert len(train) == 10 and report.eval_examples == 3
    assert all(u.startswith("eval") for u in decoded_users(demo_tokenizer, eval_data))


def test_weighted_sources_make_up_their_share(demo_tokenizer, tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", chats(30, "big"))
    small = write_jsonl(tmp_path / "small.jsonl", chats(10, "small"))
    train, _, report = build(demo_tokenizer, tmp_path, dataset_name=f"{big}:0.5,{small}:0.5")
    users = decoded_users(demo_tokenizer, train)
    assert len(users) == 40
    assert sum(u.startswith("big") for u in users) == 20 and len({u for u in users if u.startswith("big")}) == 20
    assert sum(u.startswith("small") for u in users) == 20 and len({u for u in users if u.startswith("small")}) == 10
    assert [s["in_training"] for s in report.sources] == [20, 20]


def test_a_yaml_list_of_sources(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset_name:\n  - a.jsonl:0.7\n  - {name: b.parquet, weight: 0.3}\n")
    assert parse(["--config", str(tmp_path / "run.yaml")]).data.dataset_name == "a.jsonl:0.7,b.parquet:0.3"


def test_packing_keeps_every_token_in_fewer_rows(demo_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in synthetic_conversations(30, max_exchanges=2)])
    plain, _, report = build(demo_tokenizer, tmp_path, dataset_name=str(path), max_seq_length=512)
    packed, _, packed_report = build(demo_tokenizer, tmp_path, dataset_name=str(path), max_seq_length=512, packing=True)
    assert packed_report.packed_rows == len(packed) < len(plain)
    assert all(len(ids) <= 512 for ids in packed["input_ids"])
    assert sum(map(len, packed["input_ids"])) == sum(map(len, plain["input_ids"])) == report.tokens
    assert sorted(sum(packed["input_ids"], [])) == sorted(sum(plain["input_ids"], []))
    assert packed_report.trained_tokens == report.trained_tokens
