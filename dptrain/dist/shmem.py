"""Named shared-memory arrays for the one-host fast path (weights, BN buffers, per-rank gradient slots).

The coordinator creates every segment (prefix `dptrain_<run>_`), workers attach by name and never unlink.
Python 3.11's multiprocessing.resource_tracker registers *attached* segments too and unlinks them when the attaching
process exits (bpo-39959, fixed with track=False only in 3.13), so attach() unregisters right after opening: the
creator alone owns the lifetime. `cleanup_run(run_id)` removes whatever a killed coordinator left in /dev/shm.
"""
from __future__ import annotations

import glob
import os
from multiprocessing import resource_tracker, shared_memory

import numpy as np

PREFIX = "dptrain_"


class SharedArray:
    def __init__(self, shm: shared_memory.SharedMemory, shape, dtype, owner: bool, readonly: bool = False):
        self.shm, self.owner = shm, owner
        self.array = np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=shm.buf)
        if readonly:
            self.array.flags.writeable = False

    @classmethod
    def create(cls, name: str, shape, dtype) -> "SharedArray":
        nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(shared_memory.SharedMemory(name=name, create=True, size=nbytes), shape, dtype, owner=True)

    @classmethod
    def attach(cls, spec: dict, readonly: bool = False) -> "SharedArray":
        shm = shared_memory.SharedMemory(name=spec["name"], create=False)
        try:  # see the module docstring: the attaching process must not own the segment
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (the tracker's own key)
        except Exception:
            pass
        return cls(shm, spec["shape"], spec["dtype"], owner=False, readonly=readonly)

    def spec(self) -> dict:
        return {"name": self.shm.name, "shape": list(self.array.shape), "dtype": self.array.dtype.str}

    def close(self) -> None:
        self.array = None
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def segment_name(run_id: str, what: str) -> str:
    return f"{PREFIX}{run_id}_{what}"


def leftover_segments(run_id: str = "") -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/{PREFIX}{run_id}*"))


def cleanup_run(run_id: str) -> None:
    for name in leftover_segments(run_id):
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
