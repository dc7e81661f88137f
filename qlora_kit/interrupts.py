"""Ctrl-C and SIGTERM outside training: one line, exit 128 + signal number, no process left behind.

Entry points run inside `handled()`. A first SIGINT or SIGTERM raises `Interrupted` in the main
thread, so `with` blocks and `finally` clauses unwind (a partial export folder is removed, a
`datasets` process pool is terminated); the entry point then ends every child process still alive
and prints one line saying what was interrupted (the stage set by `stage()`) and what to do. The
exit code is 130 for SIGINT and 143 for SIGTERM, as if the signal had ended the process.

Whatever exception the unwinding ends in (datasets' pool raises a TimeoutError of its own when
its `map` is interrupted), the signal recorded here decides how the process ends.

Processes forked while the handlers are installed (datasets' tokenization workers and their
manager) inherit them. There SIGINT is ignored (Ctrl-C in a terminal reaches the whole process
group; the parent ends its pool in order, and a pool whose workers died under it would start new
ones) and SIGTERM ends the process at once and quietly: the parent reports the interruption.
A second signal in the parent, while the first one unwinds, ends the children and exits at once,
and so does a watchdog if the unwinding has not finished after `UNWIND_LIMIT_S`.

Training installs its own handlers (train/stop.py: finish the step, checkpoint, then stop);
they take over while the training loop runs and hand back to these after.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, NoReturn, Optional

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_GRACE_S = 3.0
UNWIND_LIMIT_S = 20.0


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by a first SIGINT or SIGTERM; a KeyboardInterrupt, so Ctrl-C handling still applies."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    """What the handlers need: the process that owns them, the first signal, and the stage under way."""

    owner_pid: Optional[int] = None
    received: Optional[int] = None
    stage: str = "starting"
    advice: str = "nothing was written: run the same command to start again"
    watchdog: Optional[threading.Timer] = None
    final_line = threading.Lock()  # held by whichever of the main thread and the watchdog reports the stop


def stage(description: str, advice: Optional[str] = None) -> None:
    """Name the stage now under way, and what the user should do if it is interrupted.

    Args:
        description: what is happening, as in 'stopped by SIGINT while {description}'.
        advice: what was kept and how to go on; None keeps the previous stage's advice.
    """
    _State.stage = description
    if advice is not None:
        _State.advice = advice


def received() -> Optional[int]:
    """The signal number of the first interrupt, or None."""
    return _State.received


def _handle(signum: int, frame) -> None:
    if os.getpid() != _State.owner_pid:  # a forked worker: the parent reports and cleans up
        if signum == signal.SIGTERM:
            os._exit(128 + signum)
        return
    if _State.received is None:
        _State.received = signum
        _State.watchdog = threading.Timer(UNWIND_LIMIT_S, _exit_now, (signum, "the clean-up did not finish"))
        _State.watchdog.daemon = True
        _State.watchdog.start()
        raise Interrupted(signum)
    _exit_now(signum, f"second {signal.Signals(signum).name}")


def _exit_now(signum: int, why: str) -> None:
    """End the children and the process at once, without unwinding."""
    stop_children()
    _say_final(f"stopped by {signal.Signals(_State.received or signum).name} while {_State.stage} ({why}: "
               f"exited at once); {_State.advice}")
    os._exit(128 + (_State.received or signum))


@contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for the duration (main thread only; elsewhere signals keep their default effect)."""
    if threading.current_thread() is not threading.main_thread() or _State.owner_pid == os.getpid():
        yield
        return
    _State.owner_pid, _State.received, _State.final_line = os.getpid(), None, threading.Lock()
    stage("starting", "nothing was written: run the same command to start again")
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if _State.watchdog is not None:
            _State.watchdog.cancel()
        _State.owner_pid, _State.watchdog = None, None


def stop_children(grace_s: float = CHILD_GRACE_S) -> None:
    """End every descendant of this process: SIGTERM, then SIGKILL for those still alive after `grace_s`.

    Repeated until none is left, since a process pool may start a replacement for a worker that ended.
    """
    me = psutil.Process()
    for _ in range(5):
        children = me.children(recursive=True)
        if not children:
            return
        for child in children:
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(children, timeout=grace_s)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)


def exit_interrupted(signum: int) -> NoReturn:
    """End the children, print the one line, and exit with 128 + `signum`."""
    if _State.watchdog is not None:
        _State.watchdog.cancel()
    stop_children()
    _say_final(f"stopped by {signal.Signals(signum).name} while {_State.stage}; {_State.advice}")
    sys.exit(128 + signum)


def _say_final(message: str) -> None:
    """The stop's one line. The watchdog can fire while the main thread is already ending the process
    (an unwinding that took just over the limit): whichever comes first says it, the other nothing."""
    if _State.final_line.acquire(blocking=False):
        _say(message)


def _say(message: str) -> None:
    """One line on stderr, after whatever a progress bar left unfinished on the current line."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    start = "\r\x1b[K" if os.isatty(2) else "\n"  # a bar's line cleared, or ended
    os.write(2, f"{start}[qlora_kit] {message}\n".encode())
