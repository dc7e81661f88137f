"""Watching a run: TensorBoard against metrics.jsonl, --preview_data's marks against the trained labels, sample replies.

The tracked run is the chat recipe on the demo data and the demo tokenizer with a tiny random
base model (real NF4 quantization, real peft), so that it takes seconds on a CPU.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import save_tiny_model

from qlora_kit.config import parse
from qlora_kit.data.dataset import build_datasets
from qlora_kit.data.tokenize import IGNORE_INDEX
from qlora_kit.errors import UserError
from qlora_kit.recipes.chat import main
from qlora_kit.train.samples import SampleReplies, prompts_from_file, repeated_ngram_rate
from qlora_kit.train.trackers import make_trackers

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--config", str(ROOT / "recipes/chat/demo.yaml")]
STEPS, EVAL_STEPS, PROMPTS = 2, 1, 2


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, demo_tokenizer):
    work = tmp_path_factory.mktemp("observe")
    base = save_tiny_model(work / "base", vocab_size=len(demo_tokenizer))
    demo_tokenizer.save_pretrained(base)
    out = work / "run"
    result = main(DEMO + ["--model_name_or_path", str(base), "--output_dir", str(out), "--max_steps", str(STEPS),
                 "--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_steps", str(EVAL_STEPS),
                 "--save_steps", "0", "--eval_fraction", "0.005", "--report_to", "tensorboard", "--run_name", "tb",
                 "--eval_num_prompts", str(PROMPTS), "--eval_max_new_tokens", "6"])
    return out, result.model


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_holds_the_rows_of_metrics_jsonl(tracked_run):
    tracked_run, _ = tracked_run
    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    events = tracked_run / "tensorboard" / "tb"
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("eval/loss", "eval_loss")):
        expected = [(row["step"], row[key]) for row in rows if key in row]
        assert len(expected) == (STEPS if key != "eval_loss" else STEPS // EVAL_STEPS)
        logged = scalars(events, tag)
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)
    hparams = yaml.safe_load(next(events.glob("*/hparams.yml")).read_text())
    assert hparams["max_steps"] == STEPS and hparams["resolved/data/train_examples"] > 0


def test_each_eval_writes_sample_replies_with_their_repeat_rate(tracked_run):
    tracked_run, _ = tracked_run
    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    samples = [row for row in rows if "reply" in row]
    assert [(row["step"], row["sample"]) for row in samples] == [
        (step, index) for step in range(EVAL_STEPS, STEPS + 1, EVAL_STEPS) for index in range(PROMPTS)]
    assert all(isinstance(row["reply"], str) and 0 <= row["repeated_ngram_rate"] <= 1 for row in samples)
    assert all("user" in row["prompt"] for row in samples)
    events = EventAccumulator(str(tracked_run / "tensorboard" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert {f"samples/reply_{i}/text_summary" for i in range(PROMPTS)} <= set(events.Tags()["tensors"])


def test_prompts_answered_together_get_the_replies_they_get_alone(tracked_run, demo_tokenizer):
    _, model = tracked_run
    texts = ("Hi", "Tell me about the weather in Paris today, please")
    prompts = [demo_tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True)["input_ids"] for text in texts]
    together = [row["reply"] for row in SampleReplies(prompts, demo_tokenizer, 6).rows(model, 0)]
    alone = [SampleReplies([ids], demo_tokenizer, 6).rows(model, 0)[0]["reply"] for ids in prompts]
    assert together == alone and any(together)


def test_a_resumed_tensorboard_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    for resume_step, losses in ((None, {1: 1.0, 2: 2.0, 3: 3.0}), (2, {3: 30.0, 4: 40.0})):
        [tracker] = make_trackers(["tensorboard"], tmp_path, "run", "project", resume_step)
        tracker.start()
        for step, loss in losses.items():
            tracker.log({"train/loss": loss}, step=step)
        tracker.finish()
    assert scalars(tmp_path / "tensorboard" / "run", "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_one_line_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(DEMO + ["--report_to", "tensorboard,wandb", "--output_dir", str(out)])
    assert stopped.value.code == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserError, match="unknown tracker"):
        parse(DEMO + ["--report_to", "tensorbored"])


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of tokens the loss is computed on (a label, after the first position)."""
    runs: list[tuple[int, int]] = []
    for t in range(1, len(labels)):
        if labels[t] == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def test_preview_marks_exactly_the_tokens_the_run_trains_on(tmp_path, capsys, demo_tokenizer):
    page, out = tmp_path / "preview.html", tmp_path / "never-written"
    assert main(DEMO + ["--preview_data", "3", "--preview_data_file", str(page), "--output_dir", str(out)]) is None
    printed = capsys.readouterr().out
    assert not out.exists()
    blocks = re.split(r"^--- example \d+ ---\n", printed, flags=re.M)[1:]
    blocks[-1] = blocks[-1][: blocks[-1].rindex("\npacking is off")] + "\n"
    config = parse(DEMO)
    train, _, _ = build_datasets(config.data, demo_tokenizer, config.train.seed)
    assert len(blocks) == 3
    marked = 0
    for block, example in zip(blocks, train.select(range(3))):
        text, ids = block[:-1], example["input_ids"]
        runs = trained_runs(example["labels"])
        assert re.findall(r"\[\[(.*?)\]\]", text, flags=re.S) == [demo_tokenizer.decode(ids[a:b]) for a, b in runs]
        assert text.replace("[[", "").replace("]]", "") == demo_tokenizer.decode(ids)
        assert "<|im_start|>" in text  # special tokens stay visible
        marked += len(runs)
    assert page.read_text().count('<span class="trained">') == marked


def test_preview_of_packed_data_lists_a_rows_sequence_boundaries(tmp_path, capsys, demo_tokenizer):
    main(DEMO + ["--preview_data", "1", "--packing", "true", "--output_dir", str(tmp_path / "run")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    number, count = map(int, re.match(r"packed row (\d+): (\d+) sequences", line).groups())
    config = parse(DEMO + ["--packing", "true"])
    train, _, _ = build_datasets(config.data, demo_tokenizer, config.train.seed)
    positions = train[number]["position_ids"]
    starts = [t for t, p in enumerate(positions) if p == 0]
    assert count == len(starts) > 1
    assert line.endswith(", ".join(f"{a}-{b - 1}" for a, b in zip(starts, starts[1:] + [len(positions)])))


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_rate([7, 8, 9] * 4) == pytest.approx(1 - 3 / 10)  # 10 trigrams, 3 distinct
    assert repeated_ngram_rate([1, 2]) == 0.0


def test_eval_prompts_file_is_rendered_for_a_reply(tmp_path, demo_tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hi there"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]}) + "\n")
    prompts = prompts_from_file(str(path), demo_tokenizer, 5)
    texts = [demo_tokenizer.decode(ids) for ids in prompts]
    assert len(texts) == 2 and all(text.endswith("<|im_start|>assistant\n") for text in texts)
    assert "Tell me a joke" in texts[1] and "No." not in texts[1]
    path.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(UserError, match="line 1"):
        prompts_from_file(str(path), demo_tokenizer, 5)
