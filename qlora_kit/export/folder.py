"""The export's output folder: what it may not replace, room on disk, and writing it atomically.

The model is written into a hidden sibling folder (`.NAME.partial-PID`) and renamed into place only
when every file is complete and synced, so a crash, Ctrl-C or SIGTERM never leaves a folder named
NAME holding a half-written model; Ctrl-C and SIGTERM remove the partial folder as they unwind.
A partial folder left by a killed process is removed by the next export to the same place.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from qlora_kit import interrupts
from qlora_kit.errors import UserError
from qlora_kit.log import notice_once
from qlora_kit.paths import check_output_parent

PARTIAL = ".partial-"
DISK_MARGIN = 64 << 20


def check_output_folder(output: Path, protected: dict[str, Path], overwrite: bool) -> None:
    """Refuse an output folder that is, or holds, a protected folder, or holds files, unless overwriting.

    Args:
        output: the folder to write.
        protected: label -> folder that must survive (the base model, the adapter).
        overwrite: replace a non-empty output folder.
    """
    target = output.resolve()
    for label, folder in protected.items():
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise UserError(f"--output_dir {output} is the {label} folder or holds it; choose another folder")
    check_output_parent(output, beside=True)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output} is not empty; pass --overwrite true to replace it, "
                        f"or choose another folder")


def check_free_space(output: Path, needed: int) -> None:
    """Fail before writing when the disk holding `output` has no room for `needed` bytes."""
    existing = output.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed + DISK_MARGIN:
        raise UserError(f"the merged model needs {needed / 1e9:.2f} GB but {existing} has {free / 1e9:.2f} GB free; "
                        f"free some space or choose another --output_dir")


def _remove_stale_partials(output: Path) -> None:
    for folder in output.parent.glob(f".{output.name}{PARTIAL}*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            notice_once(f"removing {folder}, left by an export that was killed")
            shutil.rmtree(folder, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable. (train.checkpoint has the same helper; importing it would
    import peft, seconds of start-up the merge has no other use for.)"""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces `output`, on any failure it goes."""
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    with interrupts.handled():  # SIGTERM unwinds like Ctrl-C, through the clean-up below
        try:
            partial.mkdir()
            yield partial
            _fsync_dir(partial)
            _replace(partial, output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def _replace(partial: Path, output: Path) -> None:
    """Rename the finished folder into place; an earlier folder is moved aside first and removed after."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(partial, output)
    _fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
