"""Run a command's `main(argv)` in this process, as its command line would run, without a new interpreter.

A subprocess pays several seconds of imports; the entry points behave the same in-process: a user error is
`SystemExit(2)` with one line on stderr. One test per entry point still starts a real process.
"""

import os
import subprocess
from pathlib import Path
from typing import Callable, Optional

from qlora_kit.log import forget_notices


def run_main(main: Callable, capsys, *argv: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Call `main(list(argv))` in `cwd`; return its exit code, stdout and stderr as a finished process would."""
    capsys.readouterr()
    forget_notices()  # notices are said once per process, and each command here stands for a process
    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        returned = main(list(argv))
        code = returned if isinstance(returned, int) else 0  # a tool's main may return its exit code
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out.out, out.err)
