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

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream=None,
        width: int = 24,
        lines: bool = True,
        initial: int = 0,
    ):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = lines  # off a terminal, log each update (False: the caller logs)
        self.initial = int(initial)  # units done before (a resumed run): not in the ETA
        self.started = time.perf_counter()
        self._drawn = False

    def update(self, done: int, text: str = "") -> None:
        done = min(int(done), self.total)
        if not self.tty:
            if self.lines:
                log.info("%s %d/%d: %s", self.label, done, self.total, text)
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        fresh = done - self.initial
        eta = elapsed / fresh * (self.total - done) if fresh > 0 else float("nan")
        line = f"\r{self.label} [{bar}] {done}/{self.total} {text} (ETA {eta:.0f} s)"
        self.stream.write(line + "\033[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Erase the bar (before a log line is printed under it); the next update
        draws it again."""
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
