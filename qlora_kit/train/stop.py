"""Clean stops: SIGINT or SIGTERM during training ends the run at the next step boundary with a checkpoint.

The first signal only sets a flag; the loop finishes the optimizer step it is in (an eval in
progress is cut short), writes a checkpoint and raises `TrainingStopped`, whose exit code is
128 + the signal number, as if the signal had ended the process. A second signal exits at once
through `os._exit`: nothing is half-written that matters, since checkpoints are renamed into
place only when complete and metrics rows are single appends.

Only the main thread can install handlers; elsewhere (a notebook's worker thread) signals keep
their default effect.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

from qlora_kit.log import logger

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(SystemExit):
    """Training ended early on a signal, after writing a checkpoint; the exit code is 128 + signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM request a clean stop; a second one exits at once."""

    def __init__(self, newest_checkpoint: Optional[Path] = None) -> None:
        self.received: Optional[int] = None
        self.newest_checkpoint = newest_checkpoint  # named by the message of a second signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            logger.warning(f"{name} received: finishing the current optimizer step, then writing a checkpoint "
                           f"(send {name} again to exit at once, without it)")
            return
        newest = (f"the newest complete checkpoint is {self.newest_checkpoint}" if self.newest_checkpoint
                  else "no checkpoint was written")
        os.write(2, f"[qlora_kit] second {name}: exiting now; {newest}\n".encode())
        os._exit(128 + signum)

    def stop_message(self, step: int, checkpoint: Path) -> str:
        name = signal.Signals(self.received).name if self.received else "signal"
        return (f"stopped by {name} after step {step}; checkpoint {checkpoint} holds everything needed to go on: "
                f"run the same command with --resume_from_checkpoint latest")
