"""The rank-order sum: the same inputs give the same bits whichever rank's result arrived first."""
from __future__ import annotations

import numpy as np

from ..optim import CHUNK


def sum_in_order(out: np.ndarray, parts: list[np.ndarray], scales: list[float] | None = None) -> None:
    """out = ((parts[0] + parts[1]) + parts[2]) + ..., always in this order (rank order: the same bits whoever
    arrives first), block by block so each block of `out` stays in cache while every part is added to it.
    float16 parts (the wire format) are widened and multiplied by their power-of-two scale (exact)."""
    scales = scales or [1.0] * len(parts)
    tmp = np.empty(min(CHUNK, out.size), np.float32)
    for a in range(0, out.size, CHUNK):
        block, t = out[a:a + CHUNK], tmp[:min(CHUNK, out.size - a)]
        for i, (p, s) in enumerate(zip(parts, scales)):
            src = p[a:a + CHUNK]
            if p.dtype != out.dtype:
                np.multiply(src, np.float32(s), out=t, casting="unsafe")
                src = t
            if i == 0:
                np.copyto(block, src)
            else:
                np.add(block, src, out=block)
