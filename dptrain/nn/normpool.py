"""BatchNorm2D -> max-pool -> ReLU as one op that normalises a quarter of the data: max-pool -> BN affine -> ReLU.

In both modes BN is a per-channel affine map f(v) = (v - mean) * g + beta (train: the batch's mean and
g = gamma / std; eval: v * scale + shift from the running statistics), and each float32 operation of it is monotonic
in v: non-decreasing where g >= 0, non-increasing where g < 0. So the maximum of f over a pooling window is f of the
window's maximum of v (of its minimum where g < 0: pooled as the maximum of -v, negation being exact), bit for bit,
and ReLU commutes with both. The forward pass therefore pools the raw input and applies the affine and ReLU to the
pooled quarter (2x2 windows) instead of normalising every element; the BN moments are the same float64 sums over the
whole input as norm.batchnorm_forward's, so N workers still normalise with one process's bits.

Backward: the gradient dy reaching BN's output is zero except at each window's argmax, so BN's Σdy and Σdy·xhat
are sums over the pooled quarter (xc at an argmax is the pooled value minus the mean, kept from the forward), and

    dx = scatter_to_argmax(dq * k1) - ((x - mean) * k2 + mean_dy * k1)        (norm.grad_coeffs' k1, k2, mean_dy)

is one scatter (the pool's backward) and four passes over x, where BN - pool - ReLU made the full-size xc, BN's
output, and read dy twice more for its sums. The output is the unfused network's bit for bit; the gradients equal
it up to float32 rounding (the sums run over the nonzero terms only, in another order), and where f rounds two
different inputs of a window to the same maximum, the gradient goes to the larger input rather than to the first
of the two (either is a valid subgradient; an exact tie of inputs still goes to the first, as PyTorch's does).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .functional import ReluCache, coldot, colsum, relu_backward, widen
from .norm import AllReduce, batch_stats, eval_affine, grad_coeffs
from .pool import MaxPool2x2Cache, MaxPoolCache, maxpool2d_backward, maxpool2d_forward
from .threads import split_rows
from .workspace import Workspace, scratch


class BNPoolCache(NamedTuple):
    x: np.ndarray  # (N, H, W, C) the input (the conv's output buffer, untouched until the next forward)
    pool: MaxPoolCache | MaxPool2x2Cache  # each window's argmax
    qc: np.ndarray  # (N, OH, OW, C) pooled input minus the mean: xc at each argmax
    out: np.ndarray  # (N, OH, OW, C) the output (after ReLU)
    mean: np.ndarray  # (C,) batch mean, x's dtype
    invstd: np.ndarray  # (C,)
    gamma: np.ndarray  # (C,)
    count: float  # M of the normalisation (global under SyncBatchNorm)
    allreduce: AllReduce | None
    moments: np.ndarray  # (1 + 2C,) float64 local [count, sum, sumsq]


def _pool_signed(x: np.ndarray, g: np.ndarray, k: int, s: int, ws: Workspace | None):
    """Max-pool of x where g >= 0 and min-pool where g < 0 (channels), with the argmax cache of the signed input."""
    neg = g < 0
    if not neg.any():
        return maxpool2d_forward(x, k, s, ws)
    sign = np.where(neg, -1, 1).astype(x.dtype)  # (C,): multiplying by it is exact
    z = scratch(ws, "bnpool.signed", x.shape, x.dtype)
    np.multiply(x, sign, out=z)
    q, cache = maxpool2d_forward(z, k, s, ws)
    q *= sign
    return q, cache


def bn_pool_relu_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, train: bool,
                         running_mean: np.ndarray, running_var: np.ndarray, allreduce: AllReduce | None = None,
                         k: int = 2, s: int | None = None, ws: Workspace | None = None
                         ) -> tuple[np.ndarray, BNPoolCache | None]:
    """x: (N, H, W, C) -> relu(maxpool_k,s(batchnorm(x))) (N, OH, OW, C), cache (None in eval mode)."""
    s = s or k
    if not train:
        scale, shift = eval_affine(gamma, beta, running_mean, running_var, eps, x.dtype)
        q, _ = _pool_signed(x, scale, k, s, ws)
        out = scratch(ws, "bnpool.out", q.shape, x.dtype)
        np.multiply(q, scale, out=out)
        out += shift
        np.maximum(out, 0, out=out)
        return out, None
    stats = batch_stats(x.reshape(-1, x.shape[-1]), allreduce, eps)
    g = gamma * stats.invstd
    q, pcache = _pool_signed(x, g, k, s, ws)
    qc = scratch(ws, "bnpool.qc", q.shape, x.dtype)
    out = scratch(ws, "bnpool.out", q.shape, x.dtype)
    np.subtract(q, stats.mean, out=qc)  # the same operations, in the same order, as norm.batchnorm_forward's
    np.multiply(qc, g, out=out)
    out += beta
    np.maximum(out, 0, out=out)
    return out, BNPoolCache(x, pcache, qc, out, stats.mean, stats.invstd, gamma, stats.count, allreduce,
                            stats.moments)


def bn_pool_relu_backward(dout: np.ndarray, cache: BNPoolCache, ws: Workspace | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout: (N, OH, OW, C) -> dx (N, H, W, C), dgamma (C,), dbeta (C,) (local sums)."""
    C = dout.shape[-1]
    dq = relu_backward(dout, ReluCache(cache.out), ws)  # the gradient at the pooled BN output
    dq2, qc2 = dq.reshape(-1, C), cache.qc.reshape(-1, C)
    dbeta = colsum(dq2)
    dgamma = coldot(dq2, qc2) * cache.invstd
    k1, k2, mean_dy = grad_coeffs(dbeta, dgamma, cache.gamma, cache.invstd, cache.count, cache.allreduce)
    dqw, kq = widen(dq2)
    dqw *= np.tile(k1, kq)
    dx = maxpool2d_backward(dq, cache.pool, ws)  # dq * k1 at each argmax, 0 elsewhere
    x2 = cache.x.reshape(-1, C)
    dxw, kx = widen(dx.reshape(x2.shape))
    xw, _ = widen(x2)
    tmpw = scratch(ws, "bnpool.tmp", xw.shape, dout.dtype)
    mt, k2t, ct = np.tile(cache.mean, kx), np.tile(k2, kx), np.tile(mean_dy * k1, kx)

    def block(lo, hi):  # rows lo:hi of the wide views
        np.subtract(xw[lo:hi], mt, out=tmpw[lo:hi])
        tmpw[lo:hi] *= k2t
        tmpw[lo:hi] += ct
        dxw[lo:hi] -= tmpw[lo:hi]
    split_rows(block, xw.shape[0], xw.size)
    return dx, dgamma, dbeta
