"""The export's output folder: what it may not replace, room on disk, and writing it atomically.

The model is written into a hidden sibling folder (`.NAME.partial-PID`) and renamed into place only
when every file is complete and synced (`qlora_kit.io.atomic`), so a crash, Ctrl-C or SIGTERM never leaves a folder named
NAME holding a half-written model; Ctrl-C and SIGTERM remove the partial folder as they unwind.
The folder records its owner (`.owner`: pid and process start time, so a reused pid is not taken
for it); a partial folder whose owner is gone (`kill -9`, a power cut) is removed, and named, by
the next export into the same parent folder, whatever its name.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import psutil

from qlora_kit import interrupts
from qlora_kit.errors import UserError
from qlora_kit.io.atomic import atomic_folder
from qlora_kit.log import logger
from qlora_kit.paths import check_output_parent

PARTIAL = ".partial-"
OWNER_FILE = ".owner"
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


def _process_start(pid: int) -> Optional[float]:
    """The start time of process `pid`, or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists but is not ours to inspect: alive
        return -1.0


def _write_owner(folder: Path) -> None:
    owner = {"pid": os.getpid(), "started": psutil.Process().create_time()}
    (folder / OWNER_FILE).write_text(json.dumps(owner) + "\n")


def _owner_alive(folder: Path) -> bool:
    """Whether the process that is writing `folder` still runs (the pid in its name when it has no .owner)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, started = int(owner["pid"]), float(owner["started"])
    except (OSError, ValueError, KeyError, TypeError):
        pid_text = folder.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            return True  # not one of ours, or unreadable: leave it
        pid, started = int(pid_text), None
    running_since = _process_start(pid)
    if running_since is None:
        return False
    return started is None or running_since < 0 or abs(running_since - started) < 1.0


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial folders in `parent` whose exporting process is gone; say and return which.

    Args:
        parent: the folder an export is about to write into.
    """
    removed = []
    for folder in sorted(parent.glob(f".*{PARTIAL}*")):
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            logger.info(f"removed {folder} ({size / 1e6:.1f} MB), left by an export that was killed")
            removed.append(folder)
    return removed


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces `output`, on any failure it goes."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output.parent)
    partial = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    with interrupts.handled():  # SIGTERM unwinds like Ctrl-C, through the clean-up of atomic_folder
        with atomic_folder(output, partial) as folder:
            _write_owner(folder)
            yield folder
            (folder / OWNER_FILE).unlink()
