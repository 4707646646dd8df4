"""Checkpoints written behind the training: a snapshot of the state between two steps, written by a thread.

The Trainer copies the checkpoint's arrays into buffers kept for the purpose (a memory copy, far shorter than the
write; the first save also maps them) and goes on with the next step; a thread writes the file (checkpoint.save: a temp
file, fsync, rename) and links its other names (best.npz, step-N.npz) while the workers compute: a synchronous
save holds the coordinator for the whole write, during which no worker computes.
One write at a time: the Trainer collects the outcome of a write before it takes the next snapshot, at the end of
fit() and before it reports a failure, and reports a failed write then (the previous file of that name is intact,
as with a synchronous write). A crash while a write is in flight leaves the previous checkpoint, as a crash during
a synchronous write does; what is lost is at most the steps since the snapshot, which the next save would have
covered anyway.
"""
from __future__ import annotations

import threading

import numpy as np

from .checkpoint import CheckpointWriteError


class BackgroundWriter:
    """Runs one checkpoint job at a time in a thread, on arrays copied by `snapshot` (buffers reused across saves)."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}
        self.thread: threading.Thread | None = None
        self.token = None
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def snapshot(self, **arrays: np.ndarray | None) -> dict[str, np.ndarray | None]:
        """Copies of `arrays` (None stays None) in this writer's buffers; only while no job runs."""
        assert not self.busy, "snapshot while a write is in flight"
        out = {}
        for name, a in arrays.items():
            if a is None:
                out[name] = None
                continue
            buf = self.buffers.get(name)
            if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
                buf = self.buffers[name] = np.empty_like(a)
            np.copyto(buf, a)
            out[name] = buf
        return out

    def start(self, job, token) -> None:
        """Run job() in a thread; `token` comes back from collect() with the job's CheckpointWriteError, if any."""
        assert not self.busy, "a second write while one is in flight"
        self.token, self.error = token, None

        def run():
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - handed to the Trainer's thread by collect()
                self.error = e

        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def collect(self, wait=None) -> tuple[object, CheckpointWriteError | None] | None:
        """Wait for the job in flight (through `wait(work)`, e.g. an executor answering heartbeats meanwhile) and
        return (token, write error or None); None when nothing was in flight. Any other exception is re-raised."""
        if self.thread is None:
            return None
        thread = self.thread
        (wait or (lambda work: work()))(thread.join)
        self.thread = None
        error, self.error = self.error, None
        if error is not None and not isinstance(error, CheckpointWriteError):
            raise error
        return self.token, error
