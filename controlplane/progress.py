"""A one-line progress bar with an ETA for long offline commands (tune-embedder).

Written to a terminal it redraws one line (``\\r``); to a file or pipe it prints a plain
line every ``log_every_s`` instead, so logs stay readable. The ETA is the mean time per
step so far times the steps left (training steps cost the same, so this is enough).
"""

from __future__ import annotations

import sys
from typing import TextIO

from synapse_common import clock as clocks

WIDTH = 24


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 clock: clocks.Clock = clocks.monotonic, log_every_s: float = 30.0) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._stream = stream or sys.stderr
        self._clock = clock
        self._start = clock()
        self._last_line = -log_every_s
        self._log_every = log_every_s
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

    def update(self, steps: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + steps)
        now = self._clock()
        line = self.line(now, note)
        if self._tty:
            self._stream.write("\r" + line)
            self._stream.flush()
        elif now - self._last_line >= self._log_every or self.done == self.total:
            self._stream.write(line + "\n")
            self._last_line = now

    def line(self, now: float, note: str = "") -> str:
        share = self.done / self.total
        bar = "#" * round(WIDTH * share) + "-" * (WIDTH - round(WIDTH * share))
        elapsed = now - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        text = (f"{self.label} [{bar}] {100 * share:3.0f}% {self.done}/{self.total} "
                f"elapsed {_clock_text(elapsed)} ETA {_clock_text(eta)}")
        return f"{text} {note}".rstrip()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _clock_text(seconds: float) -> str:
    if seconds != seconds:      # NaN: no step done yet
        return "--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
