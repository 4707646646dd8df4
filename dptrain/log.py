"""One-line logs with a level letter and a rank prefix: `I coord 19:20:01 step 12 ...`, `E rank3 ...`.

Every process calls `setup(label)` once; the label says who is speaking (coord, rank0, agent@host...).
Lines go to stderr so that stdout stays free for machine-readable output (`--json`).
"""
from __future__ import annotations

import logging
import sys
import time

_FORMAT = "%(levelname).1s %(who)s %(asctime)s %(message)s"


class _Who(logging.Filter):
    def __init__(self, who: str):
        super().__init__()
        self.who = who

    def filter(self, record: logging.LogRecord) -> bool:
        record.who = self.who
        return True


def setup(who: str, level: int = logging.INFO) -> logging.Logger:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_Who(who))
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger("dptrain")


def get() -> logging.Logger:
    return logging.getLogger("dptrain")


class DropLog:
    """Lines about refused messages (a malformed, unauthenticated or foreign one), which strangers can cause at will:
    each cut to `chars`, and past `burst` lines in a `window_s` window only counted, the count said in one line when
    the next window opens. A flood of bad messages is at most burst + 1 short lines a window."""

    def __init__(self, burst: int, window_s: float, chars: int):
        self.burst, self.window_s, self.chars = burst, window_s, chars
        self.start, self.shown, self.hidden = 0.0, 0, 0

    def __call__(self, line: str) -> None:
        line = line if len(line) <= self.chars else line[:self.chars - 3] + "..."
        now = time.monotonic()
        if now - self.start > self.window_s:
            if self.hidden:
                get().warning(f"... and {self.hidden} more dropped messages not shown")
            self.start, self.shown, self.hidden = now, 0, 0
        if self.shown < self.burst:
            self.shown += 1
            get().warning(line)
        else:
            self.hidden += 1

