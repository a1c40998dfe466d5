"""SIGINT / SIGTERM during a run: the first one is recorded (the loop saves a checkpoint and exits with 130 / 143),
a second Ctrl-C stops at once. Exit codes of a run: 0 ok, 3 non-finite loss or gradient norm, 130 / 143 signals."""
from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_OK, EXIT_NONFINITE, EXIT_SIGINT, EXIT_SIGTERM = 0, 3, 130, 143


class StopSignals:
    def __init__(self):
        self.received: Optional[int] = None
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

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
