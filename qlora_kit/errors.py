"""The error type a user can cause, the failed-check type, and the entry-point wrapper that reports them.

A `UserError` is a problem the user can fix (a bad path, a bad field, bad data). A `CheckFailed` is a
check the user asked for (`--verify`) that ran and did not pass. Entry points wrap their `main` in
`exit_on_user_error`, which prints the message as one line on stderr and exits with code 2 for a
`UserError`, 1 for a `CheckFailed`, without a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
CHECK_FAILED_EXIT_CODE = 1


class UserError(Exception):
    """A problem in the user's input; its message names the problem and what to do."""


class CheckFailed(Exception):
    """A check the user asked for ran and failed; its message says what failed and where the report is."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: a `UserError` becomes one line on stderr and exit code 2, a `CheckFailed` exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        except CheckFailed as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(CHECK_FAILED_EXIT_CODE)

    return wrapper
