"""Progress of the long loops: a tqdm bar on a terminal, and a plain line at each tenth of the way
in a log. tqdm prints nothing without a TTY, and `dvc repro` under CI, nohup or a `dvc exp run
--queue` worker has none, so the 9-minute generator stage would be silent there. The lines go to
stdout with the stage's other log lines; stderr stays for the one-line error of a bad input."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


def progress(total: int, *, desc: str, initial: int = 0, unit: str = "it", enabled: bool = True,
             file: TextIO | None = None):
    """A bar with tqdm's `update`, `set_postfix` and `close` (and a context manager): tqdm's on
    stderr when it is a TTY, else `LogLines` on `file` (stdout); nothing when not `enabled` (every
    rank but 0)."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return LogLines(total, desc=desc, initial=initial, unit=unit, file=file if file is not None else sys.stdout)


class LogLines:
    """A line at each tenth of `total` that comes `min_interval_s` or more after the loop's start or
    the last line, and a last line at the end if any came before: `desc: n/total unit (p %),
    elapsed, about T left, postfix`. A loop of a few seconds prints nothing."""

    def __init__(self, total: int, *, desc: str, initial: int = 0, unit: str = "it", file: TextIO,
                 parts: int = 10, min_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.unit, self.file, self.parts = total, initial, desc, unit, file, parts
        self.min_interval_s, self.clock = min_interval_s, clock
        self.first, self.postfix, self.printed = initial, "", False
        self.t0 = self.last = clock()
        self.mark = self._mark_after(initial)

    def _mark_after(self, n: int) -> int:
        """The first of total*1/parts, total*2/parts, ... (rounded up) above n."""
        if self.total <= 0:
            return 1 << 62
        k = n * self.parts // self.total + 1
        return -(-k * self.total // self.parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.mark:
            self.mark = self._mark_after(self.n)
            now = self.clock()
            if now - self.last >= self.min_interval_s or (self.printed and self.n >= self.total):
                self._line(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        done = self.n - self.first
        left = elapsed / done * max(0, self.total - self.n) if done > 0 else 0.0
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total} %), "
              f"{elapsed:.0f} s, about {left:.0f} s left{tail}", file=self.file, flush=True)
        self.last, self.printed = now, True

    def close(self) -> None:
        pass

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
