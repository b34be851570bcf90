"""Progress of long work on the terminal: a bar on a terminal, plain lines otherwise.

On a terminal the bar is redrawn in place; when the stream is a pipe or a file (logs,
CI, batch schedulers) each update is one log line instead, so nothing fills a log with
carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    """``update(done, text)`` of ``total`` units of work labelled ``label``."""

    def __init__(self, total: int, label: str, *, stream=None, width: int = 24):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._drawn = False

    def update(self, done: int, text: str = "") -> None:
        done = min(int(done), self.total)
        if not self.tty:
            log.info("%s %d/%d: %s", self.label, done, self.total, text)
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = f"\r{self.label} [{bar}] {done}/{self.total} {text} (ETA {eta:.0f} s)"
        self.stream.write(line + "\033[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
