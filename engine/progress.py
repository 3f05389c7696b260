"""A byte-counting progress report for long start-up work (loading weights): a line redrawn in place on
a terminal, log lines otherwise. Pure Python with an injectable clock, so it is tested on the CPU."""
from __future__ import annotations

import logging
import sys
import time

GB = 1e9


class Progress:
    """Bytes done toward `total`, reported to `stream` (default: stderr at construction).

    On a TTY one line is redrawn with '\\r' at most every `min_interval` seconds:
    `loading weights  47% 7.2/15.2 GB  3.1 GB/s`. Elsewhere (a log file, a pipe) `logger` gets one line
    the first time each of 25%, 50% and 75% is passed. `finish()` reports
    `loaded 15.23 GB of weights in 4.9 s (3.1 GB/s)` either way. The clock starts at construction.
    """

    def __init__(self, total: int, what: str = "weights", stream=None, tty: bool | None = None,
                 logger: logging.Logger | None = None, clock=time.monotonic, min_interval: float = 0.1):
        self.total, self.what, self.done = int(total), what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.logger = logger or logging.getLogger(__name__)
        self.clock, self.min_interval = clock, min_interval
        self.start = clock()
        self._last_draw = None  # clock time of the last redraw; None before the first
        self._width = 0  # characters on the terminal line now, so a shorter line can blank the rest
        self._quarters_logged = 0
        self._closed = False

    def update(self, nbytes: int) -> None:
        self.done += int(nbytes)
        now = self.clock()
        if self.tty:
            if self._last_draw is None or now - self._last_draw >= self.min_interval:
                self._draw(self.line(now))
                self._last_draw = now
            return
        quarters = min(3, 4 * self.done // self.total) if self.total else 3
        if quarters > self._quarters_logged:  # one line even if an update passes several marks
            self._quarters_logged = quarters
            self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        percent = min(100, 100 * self.done // self.total) if self.total else 100
        return (f"loading {self.what} {percent:3d}% {self.done / GB:.1f}/{self.total / GB:.1f} GB  "
                f"{self._rate(now) / GB:.1f} GB/s")

    def summary(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        return (f"loaded {self.done / GB:.2f} GB of {self.what} in {now - self.start:.1f} s "
                f"({self._rate(now) / GB:.1f} GB/s)")

    def finish(self) -> None:
        """The summary line; the terminal line ends with it. Only the first finish() or close() counts."""
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self._draw(self.summary())
            self.stream.write("\n")
            self.stream.flush()
        else:
            self.logger.info("%s", self.summary())

    def close(self) -> None:
        """Stop without a summary (the work failed): end the terminal line so a traceback starts clean."""
        if self._closed:
            return
        self._closed = True
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()

    def _rate(self, now: float) -> float:
        elapsed = now - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)
