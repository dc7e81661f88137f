"""The one error type a user can cause, and the entry-point wrapper that reports it.

A `UserError` is a problem the user can fix (a bad path, a bad field, bad data). Entry points
wrap their `main` in `exit_on_user_error`, which prints the message as one line on stderr and
exits with code 2, without a traceback. The same wrapper turns Ctrl-C and SIGTERM into one line
and exit code 130 or 143, with no child process left running (interrupts.py).
"""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

from qlora_kit import interrupts

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem in the user's input; its message names the problem and what to do."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: a `UserError` becomes one line on stderr and exit code 2; SIGINT or SIGTERM
    one line and exit code 130 or 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with interrupts.handled():
            try:
                return main(*args, **kwargs)
            except UserError as error:
                if interrupts.received() is not None:  # raised while unwinding from a signal
                    interrupts.exit_interrupted(interrupts.received())
                message = " ".join(str(error).split())
                print(f"error: {message}", file=sys.stderr)
                sys.exit(USER_ERROR_EXIT_CODE)
            except BaseException as error:
                signum = interrupts.received()
                if signum is None and isinstance(error, KeyboardInterrupt):  # handlers not installed (a thread)
                    signum = signal.SIGINT
                if signum is None or (isinstance(error, SystemExit) and error.code == 128 + signum):
                    raise
                interrupts.exit_interrupted(signum)

    return wrapper
