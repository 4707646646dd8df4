"""Scratch buffers a layer owns and reuses from step to step, so a training step does no large allocations."""
from __future__ import annotations

import numpy as np


class Workspace:
    """One reusable array per tag; reallocated only when the requested shape or dtype changes."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, tag: str, shape: tuple[int, ...], dtype, zero_new: bool = False) -> np.ndarray:
        buf = self._bufs.get(tag)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.zeros(shape, dtype) if zero_new else np.empty(shape, dtype)
            self._bufs[tag] = buf
        return buf


def scratch(ws: Workspace | None, tag: str, shape: tuple[int, ...], dtype, zero_new: bool = False) -> np.ndarray:
    """A buffer from `ws`, or a fresh one when there is no workspace."""
    if ws is None:
        return np.zeros(shape, dtype) if zero_new else np.empty(shape, dtype)
    return ws.get(tag, shape, dtype, zero_new)
