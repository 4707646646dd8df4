"""One-line logs with a level letter and a rank prefix: `I coord 19:20:01 step 12 ...`, `E rank3 ...`.

Every process calls `setup(label)` once; the label says who is speaking (coord, rank0, agent@host...).
Lines go to stderr so that stdout stays free for machine-readable output (`--json`).
"""
from __future__ import annotations

import logging
import sys

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
