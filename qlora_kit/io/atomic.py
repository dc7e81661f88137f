"""Folders written atomically: into a temporary sibling, synced, then renamed into place.

One discipline for every folder the package writes whole (a checkpoint, the final adapter, the
quantized-weights cache, an export, a converted GGUF model): the files go into a temporary folder
beside the target; when the writing finishes, every file and the folder are fsynced, the folder
is renamed onto the target (an existing target is first renamed aside, then deleted), and the
parent is fsynced so the rename itself survives a power cut. If the writing raises (Ctrl-C
included), the temporary folder is deleted and the target is as it was. A process killed
outright leaves the temporary folder, under a name each caller can recognise and clear.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

TRASH = ".trash-"


def fsync_dir(folder: Path) -> None:
    """Make the creations, renames and deletions inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, then every folder under it, then `folder` itself."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            fsync_dir(path)
    fsync_dir(folder)


def _set_aside(folder: Path) -> Path:
    """Rename a folder to a hidden `.trash-` name beside it (atomic) and return that name."""
    trash = folder.with_name(f"{TRASH}{folder.name}-{time.time_ns()}")
    os.replace(folder, trash)
    return trash


def remove_folder(folder: Path) -> None:
    """Rename a folder to a hidden `.trash-` name, then delete it: a kill mid-way leaves no half folder."""
    shutil.rmtree(_set_aside(folder), ignore_errors=True)


def replace_folder(source: Path, target: Path) -> None:
    """Rename a finished folder onto `target` (an existing one is set aside first, deleted after), durably."""
    aside = _set_aside(target) if target.exists() else None
    os.replace(source, target)
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged_folder(staging: Path) -> Iterator[Path]:
    """Yield a fresh, empty `staging` folder; synced when the body finishes, deleted if it raises.

    A folder of that name left by an earlier, killed process is deleted first.
    """
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        yield staging
        fsync_tree(staging)
    except BaseException:  # Ctrl-C and SIGTERM too: nothing half-written stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_folder(target: Path, staging: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary folder to write into; when the body finishes it replaces `target` (see the module docstring).

    Args:
        target: the folder to write.
        staging: the temporary sibling's path (default: `.tmp-NAME` beside the target).
    """
    staging = staging or target.with_name(f".tmp-{target.name}")
    with staged_folder(staging) as folder:
        yield folder
    try:
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
