"""`python -m qlora_kit.recipes.generate`: chat with a trained model, or answer a file of prompts.

    python -m qlora_kit.recipes.generate                                  # chat with the demo run (runs/demo)
    python -m qlora_kit.recipes.generate --adapter_dir RUN --compare_base true
    python -m qlora_kit.recipes.generate --adapter_dir RUN --prompts p.jsonl --output answers.jsonl
    python -m qlora_kit.recipes.generate --model_name_or_path RUN/merged

The chat renders the history with the run's chat template and streams tokens as they come;
`/reset` forgets the history, `/exit` (or Ctrl-D) leaves. With --prompts, prompts are answered in
batches (left-padded). With --compare_base true every answer is given twice, by the model with its
adapter and with the adapter disabled (the same base, no second copy). Greedy by default, so the
same command gives the same answers; --do_sample true samples with --temperature and --top_p.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TextStreamer, set_seed

from qlora_kit.config import UserErrorParser, check_numbers, help_field
from qlora_kit.data.prompts import Messages, json_lines, prompt_messages
from qlora_kit.errors import UserError, exit_on_user_error
from qlora_kit.log import logger, setup_logging
from qlora_kit.model.inference import LoadedModel, load_plain, load_run

DEMO_RUN = Path("runs/demo")  # the demo preset's output_dir


@dataclass
class GenerateArguments:
    """Flags of `python -m qlora_kit.recipes.generate`: chat with, or batch-run, a trained model."""

    adapter_dir: Optional[str] = help_field(
        "A run folder (adapter + run_config.yaml): its NF4 base with the adapter, loaded as training loaded it. "
        "Default: the demo's run folder (runs/demo) when no --model_name_or_path is given.", default=None)
    model_name_or_path: Optional[str] = help_field(
        "A merged model folder or a base model (path, hub id or built-in demo name) to run alone; with "
        "--adapter_dir, the base to put the adapter on (checked against the run's fingerprint).", default=None)
    prompts: Optional[str] = help_field("A JSONL file of prompts ({\"prompt\": ...} or {\"messages\": [...]} per "
                                   "line) to answer in batches; without it, an interactive chat.", default=None)
    output: Optional[str] = help_field("With --prompts: the JSONL file of answers (default: print them).", default=None)
    compare_base: bool = help_field("Also answer with the adapter disabled (the base model), side by side.",
                               default=False)
    max_new_tokens: int = help_field("Most tokens generated per answer.", default=256)
    do_sample: bool = help_field("Sample (with --temperature and --top_p); default greedy, so answers are "
                            "reproducible.", default=False)
    temperature: float = help_field("Sampling temperature (with --do_sample true).", default=0.7)
    top_p: float = help_field("Nucleus sampling mass (with --do_sample true).", default=0.9)
    batch_size: int = help_field("Prompts generated together with --prompts.", default=8)
    system: Optional[str] = help_field("A system message put before every chat and prompt.", default=None)
    seed: int = help_field("Random seed (for --do_sample true).", default=42)
    resident_layers: int = help_field(
        "Decoder layers kept on the GPU (the rest stream from host RAM); -1: as the run's memory plan had it.",
        default=-1)


def parse(argv: list[str]) -> GenerateArguments:
    parser = UserErrorParser(GenerateArguments, prog="python -m qlora_kit.recipes.generate", allow_abbrev=False,
                     description="Chat with a trained model, or answer a JSONL file of prompts.")
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    check_numbers(vars(args))
    if args.adapter_dir is None and args.model_name_or_path is None:
        if not (DEMO_RUN / "adapter_config.json").is_file():
            raise UserError(f"no --adapter_dir or --model_name_or_path, and no demo run in {DEMO_RUN}: train it first "
                            f"(python -m qlora_kit.recipes.chat) or name a model")
        logger.info(f"no model named: chatting with the demo run in {DEMO_RUN}")
        args.adapter_dir = str(DEMO_RUN)
    if args.compare_base and args.adapter_dir is None:
        raise UserError("--compare_base true needs --adapter_dir: it answers with and without the adapter")
    if args.output is not None and args.prompts is None:
        raise UserError("--output is for the answers to --prompts FILE.jsonl; pass --prompts too")
    return args


def read_prompts(path: Path, system: Optional[str]) -> list[Messages]:
    """Each line's chat up to the answer: {"prompt": str} or {"messages": [...]} (trailing assistant turns dropped)."""
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist")
    hint = "; write one {\"prompt\": ...} object per line"
    chats = [_chat_of(record, path, number, system) for number, record in json_lines(path, str(path), hint)]
    if not chats:
        raise UserError(f"--prompts {path} holds no prompts; write one {{\"prompt\": ...}} object per line")
    return chats


def _chat_of(record: Any, path: Path, number: int, system: Optional[str]) -> Messages:
    messages = prompt_messages(record)
    if messages is None:
        raise UserError(f"{path} line {number}: expected a non-empty \"prompt\" string or \"messages\" list")
    if messages[-1].get("role") != "user":
        raise UserError(f"{path} line {number}: the chat must end with a user turn to answer")
    if system and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def generation_kwargs(args: GenerateArguments, tokenizer) -> dict[str, Any]:
    """transformers' generate() arguments; sampling ones only when sampling."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                              "pad_token_id": tokenizer.pad_token_id}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # greedy: no sampling settings from generation_config
    return kwargs


@torch.no_grad()
def answer(loaded: LoadedModel, chats: list[Messages], kwargs: dict[str, Any], streamer=None) -> list[str]:
    """Greedy (or sampled) answers to chats, generated together."""
    tokenizer = loaded.tokenizer
    inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, padding=True,
                                           return_dict=True, return_tensors="pt").to(loaded.device)
    output = loaded.model.generate(**inputs, streamer=streamer, **kwargs)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_both(loaded: LoadedModel, chats: list[Messages], kwargs: dict[str, Any], compare_base: bool,
                seed: int) -> list[dict[str, str]]:
    """The model's answers, and with --compare_base the base's (the adapter disabled), same seed for both."""
    set_seed(seed)
    rows = [{"response": text} for text in answer(loaded, chats, kwargs)]
    if compare_base:
        set_seed(seed)
        with loaded.model.disable_adapter():
            for row, text in zip(rows, answer(loaded, chats, kwargs)):
                row["base_response"] = text
    return rows


def run_prompts(loaded: LoadedModel, args: GenerateArguments) -> list[dict[str, Any]]:
    """Answer every prompt in --prompts, batch by batch; write --output (or print)."""
    chats = read_prompts(Path(args.prompts), args.system)
    kwargs = generation_kwargs(args, loaded.tokenizer)
    results = []
    for start in range(0, len(chats), args.batch_size):
        batch = chats[start:start + args.batch_size]
        for chat, row in zip(batch, answer_both(loaded, batch, kwargs, args.compare_base, args.seed + start)):
            results.append({"messages": chat, **row})
        logger.info(f"answered {len(results)}/{len(chats)} prompts")
    lines = "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(lines, encoding="utf-8")
        logger.info(f"wrote {len(results)} answers to {args.output}")
    else:
        sys.stdout.write(lines)
    return results


def chat(loaded: LoadedModel, args: GenerateArguments) -> list[Messages]:
    """The interactive chat: tokens streamed as they come; history kept until /reset; /exit or Ctrl-D leaves."""
    kwargs = generation_kwargs(args, loaded.tokenizer)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history, sessions = list(start), []
    print("chat: /reset forgets the conversation, /exit leaves", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text == "/exit":
            break
        if text == "/reset":
            sessions.append(history)
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        for label, disabled in (("model", False), ("base", True))[:2 if args.compare_base else 1]:
            print(f"{label}> ", end="", flush=True)
            set_seed(args.seed)
            if disabled:
                with loaded.model.disable_adapter():
                    answer(loaded, [history], kwargs, streamer)
            else:
                reply = answer(loaded, [history], kwargs, streamer)[0]
        history.append({"role": "assistant", "content": reply.strip()})
    sessions.append(history)
    return sessions


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> Any:
    """Parse the flags, load the model, and chat or answer the prompts file."""
    setup_logging()
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.prompts is not None:
        read_prompts(Path(args.prompts), args.system)  # a bad file is refused before the model loads
    if args.adapter_dir is not None:
        loaded = load_run(Path(args.adapter_dir), args.model_name_or_path, args.resident_layers)
    else:
        loaded = load_plain(args.model_name_or_path)
    if args.prompts is not None:
        return run_prompts(loaded, args)
    return chat(loaded, args)


if __name__ == "__main__":
    main()
