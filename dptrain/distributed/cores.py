"""Compute tokens: at most K workers of one host run forward/backward at the same moment.

With more workers than cores (`launch --workers 8` on 2 cores) the kernel time-slices every worker's forward and
backward against the others: each core switches between four working sets of tens of MB every few milliseconds, and
every worker's step ends only when the slowest has had its share. With K tokens (K = the physical cores), a worker
computes its whole shard on a core nobody else competes for, and the others wait, asleep, for a token. The work and
the bits are the same; only who runs when changes.

A token is an exclusive flock(2) on one of K files in the run's private directory: the kernel releases it when its
holder dies (a killed worker can never keep a token), and nothing else needs cleaning up. Taking one tries each file
without blocking and sleeps POLL_S between rounds: a few microseconds of latency per step against a step of tens of
milliseconds. A worker waiting on a sync-BN reduction gives its token back meanwhile (the others must reach that
layer too, or nobody would).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

POLL_S = 0.0005


class CoreTokens:
    def __init__(self, directory: Path, count: int, first: int = 0):
        self.fds = [os.open(Path(directory) / f"core-token-{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(count)]
        self.first = first % count  # where this worker starts looking (its rank): fewer collisions
        self.held: int | None = None
        self.waited_s = 0.0

    def acquire(self) -> None:
        t0 = time.perf_counter()
        n = len(self.fds)
        while True:
            for k in range(n):
                i = (self.first + k) % n
                try:
                    fcntl.flock(self.fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self.held = i
                self.waited_s += time.perf_counter() - t0
                return
            time.sleep(POLL_S)

    def release(self) -> None:
        if self.held is not None:
            fcntl.flock(self.fds[self.held], fcntl.LOCK_UN)
            self.held = None

    @contextlib.contextmanager
    def holding(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def lent(self):
        """Give the token back for the duration (waiting on the others), take one again after."""
        had = self.held is not None
        self.release()
        try:
            yield
        finally:
            if had:
                self.acquire()

    def close(self) -> None:
        self.release()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def token_count(setting: int, workers: int, cores: int) -> int:
    """dist.core_tokens: -1 (auto) = the physical cores when the host runs more workers than that, else none (0);
    k > 0: k tokens (when k < workers)."""
    k = cores if setting < 0 else setting
    return k if 0 < k < workers else 0
