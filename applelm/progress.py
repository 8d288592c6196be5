"""A tiny dependency-free progress bar on stderr (redrawn in place on a terminal, one line per 10% otherwise)."""

from __future__ import annotations

import sys
import time
from typing import IO, Optional


class Progress:
    """`with Progress("quantize", total=n) as bar: ... bar.update(k)`; silent when `enabled` is False."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream: Optional[IO[str]] = None,
                 width: int = 30):
        self.label, self.total, self.enabled, self.width = label, max(int(total), 1), enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def finish(self) -> None:
        """Mark the work complete (e.g. when some items turned out to need nothing)."""
        if self.done < self.total:
            self.done = self.total
            self._draw(final=True)

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        if not self._tty:  # logs and pipes: no carriage returns, only a few lines
            decile = int(frac * 10)
            if decile == self._last_decile and not final:
                return
            self._last_decile = decile
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.1f}s"
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
