"""Training progress: a tqdm bar on a terminal; redirected output (a file, a pipe, CI) gets one plain line per
interval instead of a carriage-return stream (issue 15 item 9: one `make train` wrote 78 KB of bar redraws)."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from tqdm import tqdm

# seconds between two progress lines when stderr is not a terminal (and the first line is not before this)
LINE_INTERVAL_S = float(os.environ.get("FMK_PROGRESS_INTERVAL_S", "30"))


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


class LineProgress:
    """What the trainer uses of tqdm (update, set_postfix, n, total, close), written as one line per interval:
    `progress: step 120/600 (20%), 1:02 elapsed, ~4:08 left | loss=3.1234 tok_s=10,120 lr=1.00e-03`."""

    def __init__(self, total: float, initial: float = 0, unit: str = "step", file=None,
                 interval_s: float = LINE_INTERVAL_S, clock=time.monotonic):
        self.total, self.n, self.unit = total, initial, unit
        self.file = file if file is not None else sys.stderr
        self.interval_s, self._clock = interval_s, clock
        self._t0 = self._last = clock()
        self._n0 = initial
        self._postfix: dict = {}
        self._closed = False

    def set_postfix(self, **kw) -> None:
        self._postfix = kw

    def update(self, k: float = 1) -> None:
        self.n += k
        if self._clock() - self._last >= self.interval_s:
            self._line()

    def _line(self) -> None:
        now = self._clock()
        self._last = now
        el = now - self._t0
        done = self.n - self._n0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = ""
        if done > 0 and self.total and self.n < self.total:
            left = f", ~{_fmt_s(el * (self.total - self.n) / done)} left"
        n = f"{self.n:.0f}" if self.unit == "s" else f"{self.n:g}"
        what = f"{n}/{self.total:g} s of training" if self.unit == "s" else f"{self.unit} {n}/{self.total:g}"
        post = (" | " + " ".join(f"{k}={v}" for k, v in self._postfix.items())) if self._postfix else ""
        print(f"progress: {what}{pct}, {_fmt_s(el)} elapsed{left}{post}", file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._n0:
                self._line()


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def run_progress(cfg, step: int, train_time_s: float):
    """The trainer's bar: seconds of training when max_time_s is set, else steps."""
    if cfg.max_time_s is not None:
        return progress_bar(round(cfg.max_time_s), round(train_time_s), "s", time_budget=True)
    return progress_bar(cfg.max_steps, step, "step")


def progress_bar(total: float, initial: float = 0, unit: str = "step", time_budget: bool = False,
                 file=None, terminal: Optional[bool] = None):
    """tqdm when `file` (default stderr) is a terminal, else LineProgress. time_budget: the bar counts seconds of
    training (max_time_s runs), so its ETA is real."""
    file = file if file is not None else sys.stderr
    if not (is_terminal(file) if terminal is None else terminal):
        return LineProgress(total, initial, unit, file=file)
    if time_budget:
        return tqdm(total=total, initial=initial, unit="s", dynamic_ncols=True, file=file,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=file)
