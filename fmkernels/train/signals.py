"""SIGINT / SIGTERM during a run: the first one is recorded (the loop saves a checkpoint and exits with 130 / 143),
a second Ctrl-C stops at once. Exit codes of a run: 0 ok, 3 non-finite loss or gradient norm, 130 / 143 signals."""
from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_OK, EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM = 0, 3, 130, 143


def exit_code_for(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


class Interrupted(Exception):
    """Raised by the handler where the run stops at once (the final evaluation, after the last save)."""


class StopSignals:
    """SIGINT/SIGTERM set `received`, and the loop saves and exits after the step; a second SIGINT stops at once
    (KeyboardInterrupt), except inside a save, which checkpoint.save_checkpoint completes first. With `immediate`
    set (the final evaluation, after the last save), a signal stops at once (Interrupted)."""

    def __init__(self):
        self.received: Optional[int] = None
        self.immediate = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum
        if self.immediate:
            raise Interrupted(signum)

    def agreed(self, world: int, all_max) -> Optional[int]:
        """The signal any rank received (all_max: parallel.all_max), or None."""
        if world <= 1:
            return self.received
        return int(all_max(float(self.received or 0), world)) or None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
