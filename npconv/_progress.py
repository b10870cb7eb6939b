"""A dependency-free progress bar on stderr (shown only when asked for and stderr is a terminal or forced)."""
from __future__ import annotations

import sys
import time

__all__ = ["progress_bar"]


class progress_bar:
    """Wrap an iterable; draw ``desc [#####.....] i/n rate`` on stderr at most 10 times a second."""

    def __init__(self, iterable=None, *, total=None, desc="", enable=True, file=None, width=30):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.width = desc, width
        self.file = file if file is not None else sys.stderr
        self.enable = bool(enable)
        self.n = 0
        self._t0 = self._last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, k=1):
        self.n += k
        now = time.perf_counter()
        if self.enable and (now - self._last > 0.1 or (self.total and self.n >= self.total)):
            self._last = now
            self._draw(now)

    def _draw(self, now):
        el = now - self._t0
        rate = self.n / el if el > 0 else 0.0
        if self.total:
            done = int(self.width * self.n / self.total)
            bar = "#" * done + "." * (self.width - done)
            s = f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f}/s {el:.0f}s"
        else:
            s = f"\r{self.desc} {self.n} {rate:.1f}/s {el:.0f}s"
        self.file.write(s)
        self.file.flush()

    def close(self):
        if self.enable:
            self._draw(time.perf_counter())
            self.file.write("\n")
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
