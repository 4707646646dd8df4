"""Batch normalisation for (N, C) and NHWC (N, H, W, C) inputs, with an optional SyncBatchNorm all-reduce.

Both cases run on the (M, C) view of x, M = N (1-D) or N*H*W (2-D): for NHWC that view is free.

Train mode normalises with batch statistics (biased variance) and reports the *local* moments
`[count, sum_c..., sumsq_c...]` (float64, length 1 + 2C) so that a coordinator can sum them over workers and
update running statistics from the exact global moments (`update_running_stats`). It never touches the running
statistics itself.

SyncBatchNorm: with `allreduce` set (a function summing a float64 array over all workers), forward
normalises with the mean/var of the all-reduced moments, and backward all-reduces `[sum(dy), sum(dy*xhat)]` and uses
the global count M:  dx = gamma * invstd * (dy - sum_dy/M - xhat * sum_dy_xhat/M).
dgamma/dbeta stay local sums (gradients are summed across workers elsewhere). N workers each holding a shard thus
compute what one process computes on the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .functional import coldot, colsum, widen
from .threads import split_rows
from .workspace import Workspace, scratch

AllReduce = Callable[[np.ndarray], np.ndarray]


class BNCache(NamedTuple):
    xc: np.ndarray  # (M, C) x minus the mean used for normalising
    invstd: np.ndarray  # (C,) 1 / sqrt(var + eps)
    gamma: np.ndarray  # (C,)
    count: float  # M of the normalisation (global under SyncBatchNorm)
    allreduce: AllReduce | None  # the SyncBatchNorm sum over workers; None: local statistics
    x_shape: tuple[int, ...]  # (N, C) or (N, H, W, C)
    moments: np.ndarray  # (1 + 2C,) float64 local [count, sum, sumsq]


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, train: bool,
                      running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                      allreduce: AllReduce | None = None, ws: Workspace | None = None):
    """x: (N, C) or (N, H, W, C); gamma, beta: (C,) -> out (same shape as x), cache (BNCache; None in eval).

    Eval mode (train=False) normalises with running_mean / running_var (C,).
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C); copies only if x is a strided view
    M = x2.shape[0]
    out = scratch(ws, "bn.out", x.shape, x.dtype)
    outw, k = widen(out.reshape(M, C))  # (M/k, k*C): see widen()
    xw, _ = widen(x2)
    if not train:
        scale, shift = eval_affine(gamma, beta, running_mean, running_var, eps, x.dtype)
        st, sh = np.tile(scale, k), np.tile(shift, k)

        def evalblock(lo, hi):
            np.multiply(xw[lo:hi], st, out=outw[lo:hi])
            outw[lo:hi] += sh
        split_rows(evalblock, xw.shape[0], xw.size)
        return out, None
    stats = batch_stats(x2, allreduce, eps)
    xc = scratch(ws, "bn.xc", (M, C), x.dtype)
    xcw, _ = widen(xc)
    mt, gt, bt = np.tile(stats.mean, k), np.tile(gamma * stats.invstd, k), np.tile(beta, k)

    def block(lo, hi):  # rows lo:hi of the wide views
        np.subtract(xw[lo:hi], mt, out=xcw[lo:hi])
        np.multiply(xcw[lo:hi], gt, out=outw[lo:hi])
        outw[lo:hi] += bt
    split_rows(block, xw.shape[0], xw.size)
    return out, BNCache(xc, stats.invstd, gamma, stats.count, allreduce, x.shape, stats.moments)


class BatchStats(NamedTuple):
    moments: np.ndarray  # (1 + 2C,) float64 local [count, sum, sumsq]
    count: float  # M of the normalisation (global under SyncBatchNorm)
    mean: np.ndarray  # (C,) in x's dtype
    invstd: np.ndarray  # (C,) 1 / sqrt(var + eps) in x's dtype


def batch_stats(x2: np.ndarray, allreduce: AllReduce | None, eps: float) -> BatchStats:
    """The normalisation of a train-mode forward over x2 (M, C): its local moments, and the mean and 1/std of the
    local (or, with allreduce, the all-reduced) ones.

    Local and SyncBatchNorm paths both take mean/var from float64 [count, Σx, Σx²]: summed in float64, the moments
    of a batch barely depend on how it is split, so after rounding to x.dtype N workers normalise with the bits one
    process uses (a float32 mean/var differing by an ulp flips ReLU/max-pool choices near ties, and one flip moves
    a gradient by ~1e-2 relative)."""
    M, C = x2.shape
    s, ss = colmoments64(x2)  # (C,), (C,) float64
    moments = np.concatenate(([float(M)], s, ss))  # (1 + 2C,) float64 local
    g = moments if allreduce is None else np.asarray(allreduce(moments.copy()), dtype=np.float64)
    count = float(g[0])
    mean64 = g[1:1 + C] / count
    var = np.maximum(g[1 + C:] / count - mean64 * mean64, 0.0)
    invstd = (1.0 / np.sqrt(var + eps)).astype(x2.dtype)
    return BatchStats(moments, count, mean64.astype(x2.dtype), invstd)


def eval_affine(gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, eps: float,
                dtype) -> tuple[np.ndarray, np.ndarray]:
    """Eval mode's out = x * scale + shift, (C,) each in dtype, from the running statistics."""
    scale = (gamma / np.sqrt(running_var + eps)).astype(dtype)
    return scale, (beta - running_mean * scale).astype(dtype)


def colmoments64(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) -> (Σ rows, Σ rows²) as float64 (C,) vectors, cast in chunks of the wide view (no (M, C) float64 copy).
    (Float32 partial sums per sample are faster, but with x² rounded to float32 the normal and the
    batch-invariant modes, 1e-6 apart after test_batch_invariant's 20 steps, parted by 3e-3: not taken.)"""
    aw, k = widen(a)  # (M/k, k*C)
    s, ss = np.zeros(aw.shape[1]), np.zeros(aw.shape[1])
    rows = max(1, (1 << 16) // aw.shape[1])  # 64K elements per chunk: 512 KB of float64 stays in cache
    for lo in range(0, aw.shape[0], rows):
        c = aw[lo:lo + rows].astype(np.float64)  # (rows, k*C)
        s += c.sum(0)
        ss += np.einsum("mc,mc->c", c, c)
    return s.reshape(k, -1).sum(0), ss.reshape(k, -1).sum(0)  # (k*C,) -> (k, C) -> (C,)


def batchnorm_backward(dout: np.ndarray, cache: BNCache, ws: Workspace | None = None):
    """dout: like x -> dx (like x), dgamma (C,), dbeta (C,) (local sums)."""
    xc, invstd, count = cache.xc, cache.invstd, cache.count
    M, C = xc.shape
    dy = dout.reshape(M, C)  # (M, C); copies only if dout is a strided view
    dbeta = colsum(dy)  # (C,)
    dgamma = coldot(dy, xc) * invstd  # (C,) sum(dy * xhat)
    k1, k2, mean_dy = grad_coeffs(dbeta, dgamma, cache.gamma, invstd, count, cache.allreduce)
    dx = scratch(ws, "bn.dx", cache.x_shape, dout.dtype)
    dxw, k = widen(dx.reshape(M, C))
    dyw, _ = widen(dy)
    xcw, _ = widen(xc)
    tmpw = scratch(ws, "bn.tmp", dxw.shape, dout.dtype)
    # dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) = (dy - mean_dy) * k1 - xc * k2
    mt, k1t, k2t = np.tile(mean_dy, k), np.tile(k1, k), np.tile(k2, k)

    def block(lo, hi):  # rows lo:hi of the wide views
        np.subtract(dyw[lo:hi], mt, out=dxw[lo:hi])
        dxw[lo:hi] *= k1t
        np.multiply(xcw[lo:hi], k2t, out=tmpw[lo:hi])
        dxw[lo:hi] -= tmpw[lo:hi]
    split_rows(block, dxw.shape[0], dxw.size)
    return dx, dgamma, dbeta


def grad_coeffs(dbeta: np.ndarray, dgamma: np.ndarray, gamma: np.ndarray, invstd: np.ndarray, count: float,
                allreduce: AllReduce | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k1, k2, mean_dy), (C,) each, of dx = (dy - mean_dy) * k1 - xc * k2, from the local Σdy (dbeta) and Σdy·xhat
    (dgamma), all-reduced first under SyncBatchNorm."""
    C, dtype = dbeta.shape[0], dbeta.dtype
    sum_dy, sum_dy_xhat = dbeta, dgamma
    if allreduce is not None:
        g = np.asarray(allreduce(np.concatenate((dbeta, dgamma)).astype(np.float64)), dtype=np.float64)
        sum_dy, sum_dy_xhat = g[:C].astype(dtype), g[C:].astype(dtype)
    k1 = gamma * invstd  # (C,)
    k2 = k1 * invstd * (sum_dy_xhat / dtype.type(count))  # coefficient of xc
    return k1, k2, sum_dy / dtype.type(count)


def running_stats_from_moments(moments: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray,
                               momentum: float) -> None:
    """Update running_mean / running_var (C,) in place from `[count, sum, sumsq]` (PyTorch's convention:
    running = (1 - m) * running + m * batch, with the unbiased batch variance)."""
    C = running_mean.shape[0]
    count = float(moments[0])
    s, ss = moments[1:1 + C], moments[1 + C:1 + 2 * C]
    mean = s / count
    var = (ss - s * s / count) / max(count - 1.0, 1.0)
    running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var + momentum * np.maximum(var, 0.0)
