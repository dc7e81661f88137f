"""Exact, one-line explanations of data files that cannot be read.

`datasets` reads the files (fast, cached); when it fails, its errors name neither the line nor
what is wrong in words a user can act on, so the file is read again here, plainly, to find the
first problem: bytes that are not UTF-8, a line that is not JSON, a file cut short, an empty file.
UTF-8 is checked before `datasets` reads a text file, since its JSON reader takes bad bytes
without complaint.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Optional

from qlora_kit.errors import UserError

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check_utf8(file: Path) -> None:
    """Refuse a text file that is not UTF-8, naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                start = max(0, min(error.start, len(chunk) - 1))
                line += chunk[:start].count(b"\n")
                raise UserError(f"{file} is not UTF-8 text (byte 0x{chunk[start]:02x} on line {line}); "
                                "save it as UTF-8") from None
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text (it ends inside a character); save it as UTF-8") from None


def json_problem(file: Path) -> Optional[str]:
    """The first problem of a .json / .jsonl file, in words, or None if it reads as records."""
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        return f"{file} is empty"
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            cut = "; the file ends early: is it cut short?" if error.pos >= len(text.rstrip()) - 1 else ""
            return f"{file} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}){cut}"
        return None
    fine = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{file} line {number} is not JSON ({error.msg}); the {fine} lines before it were fine"
        if not isinstance(value, dict):
            return f"{file} line {number} is not a JSON object (a record); the {fine} lines before it were fine"
        fine += 1
    return None


def explain_read_failure(files: list[Path], builder: str, where: str, error: BaseException) -> str:
    """One line saying why `datasets` could not read `files` as `builder`."""
    for file in files:
        if file.stat().st_size == 0:
            return f"{file} is empty"
        if builder == "json":
            problem = json_problem(file)
            if problem:
                return problem
    cause = error.__cause__ or error.__context__ or error
    reason = " ".join(str(cause).split())[:200] or type(cause).__name__
    return f"could not read {where} as {builder}: {reason}"
