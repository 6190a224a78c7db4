"""Preemption: SIGTERM/SIGUSR1 are noted from a training command's first line and acted on at a step boundary.

Kept free of heavy imports so that the CLI can install the handler before torch and Lightning load.
"""

from __future__ import annotations

import signal
import threading

from .errors import SubforeError

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (sysexits' EX_TEMPFAIL).
EXIT_PREEMPTED = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SubforeError):
    """The run saved a checkpoint on SIGTERM/SIGUSR1 and stopped; ``--resume`` continues it."""

    exit_code = EXIT_PREEMPTED


class StopRequest:
    """Notes SIGTERM/SIGUSR1 instead of dying; training checks ``signal`` at each optimiser step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict = {}

    def install(self) -> bool:
        """Take over the preemption signals; True when this call did it (and so should ``restore``)."""
        if threading.current_thread() is not threading.main_thread() or self._old:
            return False
        for sig in PREEMPT_SIGNALS:
            self._old[sig] = signal.signal(sig, self._note)
        return True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._old = {}

    def _note(self, signum, frame) -> None:
        self.signal = signum


#: The process's one request: the CLI installs it before importing torch, a run keeps it until it ends.
STOP = StopRequest()
