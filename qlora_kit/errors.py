"""The error type a user can cause, the failed-check type, and the entry-point wrapper that reports them.

A `UserError` is a problem the user can fix (a bad path, a bad field, bad data). A `CheckFailed` is a
check the user asked for (`--verify`) that ran and did not pass. Entry points wrap their `main` in
`exit_on_user_error`, which prints the message as one line on stderr and exits with code 2 for a
`UserError`, 1 for a `CheckFailed` or a `LostProcess`, without a traceback. The same wrapper turns Ctrl-C and SIGTERM
into one line and exit code 130 or 143, with no child process left running (interrupts.py).
"""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

from qlora_kit import interrupts

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
CHECK_FAILED_EXIT_CODE = 1


class UserError(Exception):
    """A problem in the user's input; its message names the problem and what to do."""


class CheckFailed(Exception):
    """A check the user asked for ran and failed; its message says what failed and where the report is."""


class LostProcess(Exception):
    """Another process of a multi-process run died; its message says where this one stopped and what to resume."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: a `UserError` becomes one line on stderr and exit code 2, a `CheckFailed` or a
    `LostProcess` exit code 1; SIGINT or SIGTERM one line and exit code 130 or 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with interrupts.handled():
            try:
                return main(*args, **kwargs)
            except UserError as error:
                if interrupts.received() is not None:  # raised while unwinding from a signal
                    interrupts.exit_interrupted(interrupts.received())
                _exit_with(error, USER_ERROR_EXIT_CODE)
            except (CheckFailed, LostProcess) as error:
                _exit_with(error, CHECK_FAILED_EXIT_CODE)
            except BaseException as error:
                signum = interrupts.received()
                if signum is None and isinstance(error, KeyboardInterrupt):  # handlers not installed (a thread)
                    signum = signal.SIGINT
                if signum is None or (isinstance(error, SystemExit) and error.code == 128 + signum):
                    raise
                interrupts.exit_interrupted(signum)

    return wrapper


def _exit_with(error: Exception, code: int) -> None:
    """Print the error's message as one line on stderr and exit with `code`."""
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
