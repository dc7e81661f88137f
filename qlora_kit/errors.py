"""The one error type a user can cause, and the entry-point wrapper that reports it.

A `UserError` is a problem the user can fix (a bad path, a bad field, bad data). Entry points
wrap their `main` in `exit_on_user_error`, which prints the message as one line on stderr and
exits with code 2, without a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem in the user's input; its message names the problem and what to do."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a `UserError` becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper
