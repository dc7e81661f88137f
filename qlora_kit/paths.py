"""Cheap checks of a folder the user names for writing, run before anything slow (a model load) starts; and the
names of a run folder's files that both training and export use (this module imports nothing heavy)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qlora_kit.errors import UserError

RUN_MARKER = "run_config.yaml"  # the file that makes a folder a qlora_kit run folder


def check_output_parent(output: Path, flag: str = "--output_dir", beside: bool = False) -> None:
    """Refuse an output folder that cannot be written: an ancestor is a file, or not writable.

    Args:
        output: the folder that will be written.
        flag: the option that named it, for the message.
        beside: the writer also creates folders beside `output` (a staged export), so its parent
            must be writable even when `output` exists.
    """
    existing = nearest_existing(output.absolute() if output.is_dir() and not beside else output.absolute().parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {output} cannot be created: {existing} is a file, not a folder; "
                        f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output} cannot be written: {existing} is not writable; choose another {flag}")


def check_writable(run_dir: Path) -> None:
    """Refuse an output folder that cannot be created or written, by creating (and removing) an empty file.

    Unlike a permission test this catches what only a write shows (a folder under /proc, a read-only
    mount seen by root).

    Raises:
        UserError: "cannot write to --output_dir RUN_DIR: reason".
    """
    existing = nearest_existing(run_dir.absolute())
    try:
        handle, probe = tempfile.mkstemp(prefix=".qlora_kit-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        where = "" if existing == run_dir.absolute() else f" ({existing} {error.strerror.lower()})"
        reason = error.strerror.lower() if not where else "it cannot be created"
        raise UserError(f"cannot write to --output_dir {run_dir}: {reason}{where}; choose another folder") from None


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
