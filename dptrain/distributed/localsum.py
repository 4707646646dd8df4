"""SyncBatchNorm's sums among the workers of one host through shared memory (`launch --workers N --bn sync`).

Through the coordinator every BN layer's reduction is a round trip: each rank sends its moments, the coordinator
waits for all of them, sums and answers; 14 of them a step for the default model, and with more workers than cores
each one also waits for the coordinator to be scheduled, once per reduction. Here each rank
writes its moments into its row of a shared array, stamps its arrival, waits for the round's other ranks' stamps
and sums the rows itself, from zeros in rank order: the coordinator's sum, bit for bit (the replay follows either).

Rows are double-buffered by call parity: a rank can be at most one call ahead of the slowest (it cannot pass call
k + 1 before every rank has arrived there, that is, has finished reading call k), and a step starts only after every
rank has sent its result for the one before. A stamp is 1 + (step, attempt, call) packed into an int64, so the
stamps of a later step or attempt are larger: a rank of an abandoned attempt may sum rows of a newer one, and its
result is dropped by the coordinator like any late answer. While waiting, a STEP, STOP or MESH from the coordinator
(a new attempt after a lost rank, the end) raises Preempted, as the coordinator's reduction does; a rank that died
is the coordinator's to notice (heartbeats, exit codes, step_timeout_s), and its STEP or STOP is what frees the
others. Waiting yields the core (sched_yield, then sleeps of 50 us growing to 0.2 ms): with more workers than cores the
ranks still computing get it.
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from . import protocol as P
from .peer import Preempted

PREEMPTING = (P.Kind.STEP, P.Kind.STOP, P.Kind.MESH)


def supported() -> bool:
    """x86-64 only: its stores become visible in program order (a row's few KB of ordinary stores, then the stamp),
    which is what a reader that sees the stamp relies on; Python has no memory fence to give that elsewhere (ARM
    may reorder them), so there the sums keep going through the coordinator."""
    return platform.machine().lower() in ("x86_64", "amd64")


def width(model) -> int:
    """Floats per row: the longest reduction of the model's BN layers (forward [count, sum, sumsq])."""
    return max((bn.moments_size for bn in model.bn_layers), default=1)


def stamp(step: int, attempt: int, call: int) -> int:
    return 1 + (step << 28) + (attempt << 16) + call


class LocalSum:
    """rows: (2, slots, width) float64 and seen: (slots,) int64, shared by the host's workers; `link` the rank's
    PeerLink (its step and attempt, and the coordinator's messages while waiting)."""

    def __init__(self, rows: np.ndarray, seen: np.ndarray, rank: int, link):
        self.rows, self.seen, self.rank, self.link = rows, seen, rank, link

    def fits(self, local: np.ndarray) -> bool:
        return local.size <= self.rows.shape[2]

    def allreduce(self, call: int, local: np.ndarray, ranks: list[int]) -> np.ndarray:
        """Σ of `local` over `ranks` (the round's), from zeros in rank order; `call`: its index within the step."""
        n = local.size
        rows = self.rows[call % 2]
        rows[self.rank, :n] = local
        ticket = stamp(self.link.step, self.link.attempt, call)
        self.seen[self.rank] = ticket  # after the row: x86 keeps (these ordinary) stores in order (supported())
        order = sorted(ranks)
        self._wait(np.asarray(order), ticket)
        total = np.zeros(n, np.float64)
        for r in order:
            total += rows[r, :n]
        return total

    def _wait(self, ranks: np.ndarray, ticket: int) -> None:
        spins, delay = 0, 5e-5
        while (self.seen[ranks] < ticket).any():
            msg = self.link.poll_once()
            if msg is not None and msg.kind in PREEMPTING:
                raise Preempted(msg)
            if spins < 16:
                spins += 1
                os.sched_yield()
            else:
                time.sleep(delay)
                delay = min(2e-4, 2 * delay)
