"""The generate recipe on a tiny run with the demo tokenizer: batch answers, the base beside them, the chat."""

import json

import pytest

from export_runs import make_run
from tiny_models import save_tiny_model
from qlora_kit.errors import UserError
from qlora_kit.recipes.generate import main, read_prompts


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_tokenizer):
    folder = tmp_path_factory.mktemp("generate")
    _, run, _ = make_run(folder, "llama", tokenizer=demo_tokenizer, model_overrides={"vocab_size": 49152}, scale=2.0)
    return run


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": "What is the capital of France?"}, {"prompt": "Say hello."},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "dropped"}]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_prompts_file_is_answered_greedily_with_the_base_beside(run_dir, prompts, tmp_path):
    out = tmp_path / "answers.jsonl"
    argv = ["--adapter_dir", str(run_dir), "--prompts", str(prompts), "--output", str(out), "--compare_base", "true",
            "--max_new_tokens", "6", "--batch_size", "2"]
    main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(row["response"] and row["base_response"] for row in rows)
    assert rows[2]["messages"][-1] == {"role": "user", "content": "How are you?"}
    assert any(row["response"] != row["base_response"] for row in rows)  # the adapter changes the answers
    again = tmp_path / "again.jsonl"
    main(argv[:5] + [str(again), "--max_new_tokens", "6", "--batch_size", "3"])
    assert [json.loads(line)["response"] for line in again.read_text().splitlines()] == [r["response"] for r in rows]


def test_the_chat_streams_answers_keeps_history_and_resets(run_dir, monkeypatch, capsys):
    typed = iter(["Hello there", "And again?", "/reset", "New topic", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    sessions = main(["--adapter_dir", str(run_dir), "--max_new_tokens", "4", "--compare_base", "true"])
    assert [len(history) for history in sessions] == [4, 2]
    assert [m["content"] for m in sessions[0] if m["role"] == "user"] == ["Hello there", "And again?"]
    out = capsys.readouterr().out
    assert out.count("model> ") == 3 and out.count("base> ") == 3 and "(history cleared)" in out


@pytest.mark.parametrize("case", ["empty prompts", "no adapter", "another base"])
def test_bad_input_is_one_line_and_exit_2(case, run_dir, tmp_path, capsys):
    argv, expected = {
        "empty prompts": (["--adapter_dir", str(run_dir), "--prompts", str(tmp_path / "empty.jsonl")], "holds no prompts"),
        "no adapter": (["--adapter_dir", str(tmp_path)], "holds no adapter"),
        "another base": (["--adapter_dir", str(run_dir), "--model_name_or_path", str(tmp_path / "other")],
                         "is not the model"),
    }[case]
    (tmp_path / "empty.jsonl").write_text("\n")
    if case == "another base":
        save_tiny_model(tmp_path / "other", "llama", seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_prompts_file_is_read_as_chats_to_answer(tmp_path):
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye"}]
    path.write_text(json.dumps({"prompt": "One"}) + "\n\n" + json.dumps({"messages": chat}) + "\n")
    chats = read_prompts(path, system="Be brief.")
    assert chats[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"}]
    assert chats[1][1:] == chat[:3]  # answered at the last user turn: the trailing reply is dropped
    for line, expected in [("not json", "line 1 is not JSON"), ('{"prompt": "  "}', "line 1: expected a non-empty"),
                           ('{"messages": [{"role": "assistant", "content": "x"}]}', "line 1: expected a non-empty")]:
        path.write_text(line + "\n")
        with pytest.raises(UserError, match=expected):
            read_prompts(path, system=None)
