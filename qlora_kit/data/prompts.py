"""Prompt files: .jsonl files of chats to answer, one {"prompt": text} or {"messages": [...]} per line.

Read by `recipes/generate.py --prompts` and by the sample replies of training (`--eval_prompts`); each
caller words its own errors, since each names its own flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from qlora_kit.errors import UserError

Messages = list[dict[str, str]]


def json_lines(path: Path, where: str, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line; a line that is not JSON is a UserError naming it."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where} line {number} is not JSON{hint}") from None


def prompt_messages(record: Any) -> Optional[Messages]:
    """The chat a record asks to answer: its prompt as a user turn, or its messages without trailing
    assistant turns; None when it holds neither."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    if isinstance(record.get("messages"), list):
        messages = [dict(message) for message in record["messages"] if isinstance(message, dict)]
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        return messages or None
    return None
