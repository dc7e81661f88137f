"""Logging for qlora_kit: one logger, a plain format, and `notice_once` for choices made on the user's behalf."""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("qlora_kit")
_said: set[str] = set()


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a message is logged (a redirected or captured stderr too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the current sys.stderr is always used
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send qlora_kit's messages to stderr as plain lines; quieten the libraries' chatter.

    In a run of several processes (`accelerate launch` sets RANK) the first process speaks for the run;
    the others say only warnings and errors.
    """
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[qlora_kit] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
    # Deprecation notices that peft and accelerate trigger inside transformers are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def notice_once(message: str) -> None:
    """Log a message the first time it is seen (an upcast, a fallback, a changed choice)."""
    if message not in _said:
        _said.add(message)
        logger.info(message)


def forget_notices() -> None:
    """Say every notice again from now on (a second command run in the same process)."""
    _said.clear()
