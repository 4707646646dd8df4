"""The rank-order sum: the same inputs give the same bits whichever rank's result arrived first; and the factored
Linear's weight gradient computed from its factors in fixed blocks, the same bits whoever computes which part."""
from __future__ import annotations

from dataclasses import dataclass

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


ROWS = 128  # the factored weight gradient is computed in blocks of this many rows of W: fixed GEMM shapes


@dataclass
class Factors:
    """One host's factored Linear (dist.factored): its K x F weight at flat offset w0 and every rank's inputs x
    (b_r x K) and output gradients dy (b_r x F) of that layer, in rank order (= the global batch's sample order)."""
    w0: int
    K: int
    F: int
    xs: list[np.ndarray]
    dys: list[np.ndarray]

    @property
    def w1(self) -> int:
        return self.w0 + self.K * self.F

    @classmethod
    def of_slots(cls, slots: tuple, ranks: list[int], counts: list[int]) -> Factors:
        """From a host's factor arrays (w0, K, F, x (slots, cap, K), dy (slots, cap, F)): the ranks' first rows."""
        w0, K, F, fx, fdy = slots
        return cls(w0, K, F, [fx[r][:n] for r, n in zip(ranks, counts)], [fdy[r][:n] for r, n in zip(ranks, counts)])


def local_factors_pay(batch: int, ranks: int, rows: int, cols: int) -> bool:
    """On one host: do the ranks' factors (batch x (rows + cols) floats written and read once) cost less memory
    traffic than their weight gradients (ranks x rows x cols, each written by its rank and read by the reduction)?"""
    return batch * (rows + cols) < ranks * rows * cols


def reduce_range(out: np.ndarray, parts: list[np.ndarray], lo: int, hi: int, scales: list[float] | None = None,
                 factors: Factors | None = None) -> None:
    """out[lo:hi] = the rank-order sum of parts over [lo, hi), except the factored Linear's weights (when `factors`),
    whose gradient is dW = X^T dY over the whole batch, computed in fixed blocks of ROWS rows: whether one worker
    computes a slice of it or one process all of it, every element comes from the same GEMM on the same inputs."""
    cuts = [(lo, hi)] if factors is None else [(lo, min(hi, factors.w0)), (max(lo, factors.w1), hi)]
    for a, b in cuts:
        if a < b:
            sum_in_order(out[a:b], [p[a:b] for p in parts], scales)
    if factors is not None and max(lo, factors.w0) < min(hi, factors.w1):
        factored_rows(out, max(lo, factors.w0), min(hi, factors.w1), factors)


def factored_rows(out: np.ndarray, a: int, b: int, f: Factors) -> None:
    """out[a:b] (inside the factored weight) from its factors: each block of ROWS rows of W that [a, b) touches is one
    GEMM (rows x batch) @ (batch x F), and the part of it inside [a, b) is copied out."""
    dy = np.concatenate(f.dys) if len(f.dys) > 1 else f.dys[0]
    k_first, k_last = (a - f.w0) // f.F, -(-(b - f.w0) // f.F)
    for k0 in range(k_first // ROWS * ROWS, k_last, ROWS):
        k1 = min(k0 + ROWS, f.K)
        x = np.concatenate([xr[:, k0:k1] for xr in f.xs])  # (batch, rows), contiguous
        block = np.matmul(x.T, dy).ravel()  # W's flat [w0 + k0 F, w0 + k1 F)
        s, e = max(a, f.w0 + k0 * f.F), min(b, f.w0 + k1 * f.F)
        off = f.w0 + k0 * f.F
        np.copyto(out[s:e], block[s - off:e - off])


def one_host_factored(cfg, model, ranks: int):
    """The Linear whose weight gradient the ranks of one host leave as factors for the reduction (dist.factored,
    gradients in shared memory, not --batch-invariant, and cheaper than the ranks' weight gradients), or None.
    The launcher and the replay both ask here: their bits depend on the answer."""
    layer = model.factor_layer()
    if layer is None or not cfg.dist.factored or cfg.dist.transport != "shm" or cfg.train.batch_invariant_block:
        return None
    return layer if local_factors_pay(cfg.train.batch_size, ranks, *layer.w.shape) else None
