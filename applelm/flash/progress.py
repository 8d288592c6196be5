"""A small progress bar on stderr (no dependencies): redrawn in place on a terminal, a few plain lines
otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.done = max(1, total), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self._last = time.perf_counter()
        self._last_decile = -1
        self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if 0 < frac < 1 else 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {elapsed:.1f}s"
                              + (f" eta {eta:.0f}s" if not final and frac > 0 else "") + ("\n" if final else ""))
            self.stream.flush()
            return
        decile = int(frac * 10)
        if final or decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({elapsed:.1f}s)\n")
            self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if self.done == self.total or now - self._last > 0.1:
            self._last = now
            if self.done < self.total:
                self._draw()

    def close(self) -> None:
        self.done = self.total
        self._draw(final=True)
