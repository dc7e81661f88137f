"""Records in a supported shape -> a list of chat messages ({"role", "content"} dicts).

Supported here: the built-in `chatterbot-en` corpus, and .jsonl / .json files of records that
hold an OpenAI-style `messages` list.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from qlora_kit.errors import UserError
from qlora_kit.sources import DEMO_DATASET, demo_dataset_files

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def load_conversations(dataset_name: str) -> list[list[Message]]:
    """Every conversation of a dataset, as lists of messages."""
    if dataset_name == DEMO_DATASET:
        return chatterbot_conversations(demo_dataset_files())
    path = Path(dataset_name).expanduser()
    if not path.exists():
        raise UserError(f"dataset {dataset_name} does not exist; give a .jsonl/.json file or '{DEMO_DATASET}'")
    records = read_json_records(path)
    return [messages_from_record(record, f"{path} record {i + 1}") for i, record in enumerate(records)]


def chatterbot_conversations(files: list[Path]) -> list[list[Message]]:
    """chatterbot-corpus YAML: each conversation is a list of lines spoken in turn, user first."""
    conversations = []
    for file in files:
        for lines in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(line).strip() for line in lines]
            turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
            if turns and all(turns):
                roles = ["user", "assistant"] * (len(turns) // 2)
                conversations.append([{"role": r, "content": t} for r, t in zip(roles, turns)])
    return conversations


def read_json_records(path: Path) -> list[dict]:
    """Records of a .jsonl (one JSON object a line) or .json (a list of objects) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(records, list):
            raise UserError(f"{path} must hold a JSON list of records")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} line {number} is not JSON ({error.msg}); the {len(records)} lines before it were fine"
            ) from None
    return records


def messages_from_record(record: dict, where: str) -> list[Message]:
    """An OpenAI-style `messages` record, checked."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise UserError(f"{where} has no 'messages' list")
    messages = []
    for message in record["messages"]:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where} has an unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where} has a message whose content is not text")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn to train on")
    return messages
