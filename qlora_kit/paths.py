"""Cheap checks of a folder the user names for writing, run before anything slow (a model load) starts."""

from __future__ import annotations

import os
from pathlib import Path

from qlora_kit.errors import UserError


def check_output_parent(output: Path, flag: str = "--output_dir", beside: bool = False) -> None:
    """Refuse an output folder that cannot be written: an ancestor is a file, or not writable.

    Args:
        output: the folder that will be written.
        flag: the option that named it, for the message.
        beside: the writer also creates folders beside `output` (a staged export), so its parent
            must be writable even when `output` exists.
    """
    existing = output.absolute() if output.is_dir() and not beside else output.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {output} cannot be created: {existing} is a file, not a folder; "
                        f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output} cannot be written: {existing} is not writable; choose another {flag}")
