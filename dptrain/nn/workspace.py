"""Scratch buffers a layer owns and reuses from step to step, so a training step does no large allocations."""
from __future__ import annotations

import numpy as np


class Workspace:
    """One reusable buffer per tag. A request no larger than the largest so far is a view of the front of the same
    memory, so switching between batch sizes (training shards, an evaluation's short last batch) allocates nothing:
    a fresh buffer's first touch costs a page fault per page (a training step after an evaluation took thousands
    when every shape change reallocated). `zero_new` buffers are
    zero when new, and zeroed again when the requested shape changes (their callers rely on untouched zero borders)."""

    def __init__(self) -> None:
        self._bufs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tag -> (raw bytes, the last view handed out)

    def get(self, tag: str, shape: tuple[int, ...], dtype, zero_new: bool = False) -> np.ndarray:
        raw, view = self._bufs.get(tag, (None, None))
        if view is not None and view.shape == shape and view.dtype == dtype:
            return view
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        grow = raw is None or raw.nbytes < nbytes
        if grow:
            raw = np.zeros(max(nbytes, 1), np.uint8) if zero_new else np.empty(max(nbytes, 1), np.uint8)
        view = raw[:nbytes].view(dtype).reshape(shape)
        if zero_new and not grow:
            view.fill(0)
        self._bufs[tag] = (raw, view)
        return view


def scratch(ws: Workspace | None, tag: str, shape: tuple[int, ...], dtype, zero_new: bool = False) -> np.ndarray:
    """A buffer from `ws`, or a fresh one when there is no workspace."""
    if ws is None:
        return np.zeros(shape, dtype) if zero_new else np.empty(shape, dtype)
    return ws.get(tag, shape, dtype, zero_new)
