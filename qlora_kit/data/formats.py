"""Records of every supported shape -> one internal shape: a list of chat messages.

A format is detected per source from its columns, or named with `--dataset_format`:

- `messages`: OpenAI-style `messages` (or `conversations`) holding {role, content} objects, roles
  system / user / assistant.
- `sharegpt`: `conversations` holding {from, value} objects, from human / gpt / system.
- `alpaca`: `instruction`, optional `input`, `output` (and an optional `system`).
- `prompt_completion`: `prompt` and `completion`, each text or a list of {role, content}.
- `text`: `text`, for language modelling: one message of role "text", trained on every token.

`check_columns` refuses a source whose columns cannot hold its format (a one-line error);
`to_messages` turns one record into messages or raises `SkipRecord` naming what is wrong with it,
so the data stage can count such records (or stop at the first with --strict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from datasets import Features, Json, LargeList, List, Sequence, Value

from qlora_kit.errors import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
TEXT_ROLE = "text"
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
TEXT_TYPES = ("string", "large_string")


class SkipRecord(Exception):
    """One record cannot become a conversation; the message is the reason, shared by like records."""


# --- detection and column checks -------------------------------------------------------------

def _item_keys(feature: Any) -> set[str] | None:
    """The keys of the objects in a list column ({role, content}, ...), or None if it is no such list."""
    if isinstance(feature, (List, LargeList, Sequence)) and isinstance(feature.feature, dict):
        return set(feature.feature)
    return None


def _type_name(feature: Any) -> str:
    if isinstance(feature, Value):
        return feature.dtype
    if _item_keys(feature) is not None:
        return "a list of objects"
    if isinstance(feature, (List, LargeList, Sequence)):
        return "a list"
    return "an object" if isinstance(feature, dict) else type(feature).__name__


def _is_text(feature: Any) -> bool:
    """Text (or all null), or values of mixed types (datasets' Json feature), which are checked per record."""
    return isinstance(feature, Json) or (isinstance(feature, Value) and feature.dtype in (*TEXT_TYPES, "null"))


def conversation_column(columns) -> str:
    """The column that holds the turns of a chat record: `messages`, else `conversations`."""
    return "conversations" if "messages" not in columns and "conversations" in columns else "messages"


def detect_format(features: Features, where: str) -> str:
    """The format a source's columns show; a one-line error naming the columns when none fits."""
    columns = set(features)
    if "messages" in columns or "conversations" in columns:
        keys = _item_keys(features[conversation_column(columns)]) or set()
        return "sharegpt" if {"from", "value"} <= keys else "messages"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise UserError(
        f"cannot tell the format of {where} from its columns ({', '.join(sorted(columns)) or 'none'}): expected "
        f"'messages', 'conversations', 'instruction'+'output', 'prompt'+'completion' or 'text' (a .json file must "
        f"hold a list of records); rename the columns or set --dataset_format"
    )


def required_columns(fmt: str, columns) -> tuple[str, ...]:
    return {"messages": (conversation_column(columns),), "sharegpt": ("conversations",),
            "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "text": ("text",)}[fmt]


def check_columns(features: Features, fmt: str, where: str) -> None:
    """Refuse a source whose columns are missing or of the wrong type for its format (one line)."""
    needed = required_columns(fmt, features)
    missing = [c for c in needed if c not in features]
    if missing:
        raise UserError(f"{where} has no {', '.join(repr(c) for c in missing)} column, which the {fmt} format needs "
                        f"(its columns: {', '.join(sorted(features))}); set --dataset_format to match the data")
    if fmt in ("messages", "sharegpt"):
        keys = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        _check_turns_column(features[needed[0]], needed[0], keys, where)
        return
    optional = [c for c in ("input", "system") if fmt == "alpaca" and c in features]
    for column in (*needed, *optional):
        feature = features[column]
        if fmt == "prompt_completion" and _item_keys(feature) is not None:
            _check_turns_column(feature, column, ("role", "content"), where)
        elif not _is_text(feature):
            expected = "text or a list of {role, content} objects" if fmt == "prompt_completion" else "text"
            _wrong_type(where, column, feature, expected)


def _check_turns_column(feature: Any, column: str, keys: tuple[str, str], where: str) -> None:
    if isinstance(feature, Json):
        return  # values of mixed types: every record is checked on its own
    item_keys = _item_keys(feature)
    if item_keys is None:
        _wrong_type(where, column, feature, f"a list of {{{', '.join(keys)}}} objects")
    if not set(keys) <= item_keys:
        raise UserError(f"column '{column}' of {where} holds objects with keys {', '.join(sorted(item_keys))}; "
                        f"each turn needs {' and '.join(keys)}; set --dataset_format to match the data")
    if not _is_text(feature.feature[keys[1]]):
        _wrong_type(where, f"{column}.{keys[1]}", feature.feature[keys[1]], "text")


def _wrong_type(where: str, column: str, feature: Any, expected: str) -> None:
    raise UserError(f"column '{column}' of {where} holds {_type_name(feature)} values; it must be {expected}")


# --- one record -> messages ------------------------------------------------------------------

def to_messages(record: dict[str, Any], fmt: str) -> list[Message]:
    """One record of a format as chat messages; raises `SkipRecord` with the reason it cannot be."""
    if fmt == "messages":
        column = conversation_column(record)
        return _checked(_turns(record.get(column), column, "role", "content", _plain_role))
    if fmt == "sharegpt":
        return _checked(_turns(record.get("conversations"), "conversations", "from", "value", _sharegpt_role))
    if fmt == "alpaca":
        instruction, extra = _text(record, "instruction"), record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise SkipRecord("'input' is not text")
        user = f"{instruction}\n\n{extra}" if _filled(extra) else instruction
        system = [{"role": "system", "content": record["system"]}] if _filled(record.get("system")) else []
        return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
    if fmt == "prompt_completion":
        return _checked(_side(record, "prompt", "user") + _side(record, "completion", "assistant"))
    if fmt == "text":
        return [{"role": TEXT_ROLE, "content": _text(record, "text")}]
    raise ValueError(f"unknown format {fmt}")


def _filled(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if value is None:
        raise SkipRecord(f"missing '{column}'")
    if not isinstance(value, str):
        raise SkipRecord(f"'{column}' is not text")
    if not value.strip():
        raise SkipRecord(f"empty '{column}'")
    return value


def _plain_role(role: Any) -> str:
    if role not in ROLES:
        raise SkipRecord(f"unknown role {role!r}")
    return role


def _sharegpt_role(role: Any) -> str:
    if role not in SHAREGPT_ROLES:
        raise SkipRecord(f"unknown role {role!r}")
    return SHAREGPT_ROLES[role]


def _turns(turns: Any, column: str, role_key: str, content_key: str, role_of) -> list[Message]:
    if turns is None:
        raise SkipRecord(f"missing '{column}'")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SkipRecord(f"'{column}' is not a list of objects")
    messages = []
    for turn in turns:
        role, content = role_of(turn.get(role_key)), turn.get(content_key)
        if content is None:
            raise SkipRecord("a message without content")
        if not isinstance(content, str):
            raise SkipRecord("a message whose content is not text")
        if not content.strip():
            raise SkipRecord("a message with empty content")
        messages.append({"role": role, "content": content})
    return messages


def _side(record: dict[str, Any], column: str, role: str) -> list[Message]:
    value = record.get(column)
    if isinstance(value, list):
        return _turns(value, column, "role", "content", _plain_role)
    return [{"role": role, "content": _text(record, column)}]


def _checked(messages: list[Message]) -> list[Message]:
    if not messages:
        raise SkipRecord("no messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipRecord("no assistant turn")
    return messages


# --- the built-in corpus -----------------------------------------------------------------------

def chatterbot_records(files: list[Path]) -> list[dict[str, list[Message]]]:
    """chatterbot-corpus YAML as `messages` records: each conversation is lines spoken in turn, user first."""
    records = []
    for file in files:
        for lines in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(line).strip() for line in lines]
            turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
            if turns and all(turns):
                roles = ["user", "assistant"] * (len(turns) // 2)
                records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return records
