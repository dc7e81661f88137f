"""Logging for qlora_kit: one logger, a plain format, and `notice_once` for choices made on the user's behalf."""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger("qlora_kit")
_said: set[str] = set()


def setup_logging(level: int = logging.INFO) -> None:
    """Send qlora_kit's messages to stderr as plain lines; quieten the libraries' chatter."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[qlora_kit] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
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
