"""Elementwise and dense kernels (ReLU, Linear, Flatten, column sums).

Conventions for all of dptrain.nn (conv.py, pool.py, norm.py, this file):
- Layout is NHWC: images are (N, H, W, C). im2col of NHWC gives (N*OH*OW, kh*kw*C) rows directly and the GEMM
  result (N*OH*OW, F) already *is* the NHWC output, so no transposes anywhere. Conv weights are (kh, kw, C, F),
  Linear weights (in, out). A flattened image is its NHWC bytes: index ((h * W) + w) * C + c.
- Every op is a pair `x_forward(...) -> (out, cache)`, `x_backward(dout, cache) -> (dx, ...)` (CS231n style).
- Kernels keep the input dtype (float32 for training, float64 for finite-difference tests).
- `ws` (optional): a `Workspace` owned by the calling layer. Outputs and scratch then live in arrays that are reused
  on the next call with the same shape, so a training step does no large allocations (and no page faults).
  Consequence: an output is only valid until the same layer runs again; copy it if you need to keep it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .workspace import Workspace, scratch


def widen(a: np.ndarray) -> tuple[np.ndarray, int]:
    """View a C-contiguous (M, C) array as (M/k, k*C) with k*C around 2048, returning (view, k).

    Per-channel reductions and (C,)-vector broadcasts over (M, C) with small C run numpy's inner loop C elements at
    a time; on the wide view the loops are k times longer, so numpy's per-loop overhead is paid k times less often. A (C,) vector broadcasts
    against the wide view as `np.tile(v, k)`; row sums of the wide view fold back with `.reshape(k, C).sum(0)`.
    Every accumulator sums only M/k terms, which also keeps float32 sums accurate (an accumulator's rounding error grows with
    the number of terms it sums).
    """
    M, C = a.shape
    k = max(1, min(M, 2048 // C))
    while M % k:
        k -= 1
    return a.reshape(M // k, k * C), k  # (M/k, k*C)


def colsum(a: np.ndarray) -> np.ndarray:
    """(M, C) -> (C,) sum over rows."""
    aw, k = widen(a)
    return aw.sum(0).reshape(k, -1).sum(0)  # (k*C,) -> (k, C) -> (C,)


def coldot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, C), (M, C) -> (C,) sum over rows of a * b, without a temporary (M, C) product."""
    aw, k = widen(a)
    bw, _ = widen(b)
    return np.einsum("mc,mc->c", aw, bw).reshape(k, -1).sum(0)


class ReluCache(NamedTuple):
    out: np.ndarray  # like x: the forward output, whose sign is the derivative


class LinearCache(NamedTuple):
    x: np.ndarray  # (N, D)
    w: np.ndarray  # (D, O)


class FlattenCache(NamedTuple):
    x_shape: tuple[int, ...]  # (N, H, W, C)


def relu_forward(x: np.ndarray, ws: Workspace | None = None) -> tuple[np.ndarray, ReluCache]:
    """out = max(x, 0). x: any shape."""
    out = scratch(ws, "relu.out", x.shape, x.dtype)
    np.maximum(x, 0, out=out)
    return out, ReluCache(out)


def relu_backward(dout: np.ndarray, cache: ReluCache, ws: Workspace | None = None) -> np.ndarray:
    """dx = dout * (out > 0); sign(out) is that mask as floats, computed in one SIMD pass (out >= 0)."""
    out = cache.out
    dx = scratch(ws, "relu.dx", out.shape, out.dtype)
    np.sign(out, out=dx)  # 1 where out > 0, 0 where out == 0
    dx *= dout
    return dx


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, LinearCache]:
    """out = x @ w + b. x: (N, D), w: (D, O), b: (O,) or None -> out (N, O)."""
    out = x @ w  # (N, O)
    if b is not None:
        out += b
    return out, LinearCache(x, w)


def linear_backward(dout: np.ndarray, cache: LinearCache, need_dx: bool = True, dw_out: np.ndarray | None = None,
                    db_out: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout: (N, O) -> dx (N, D) (None if not need_dx), dw (D, O), db (O,).

    dw_out / db_out: optional arrays the gradients are written into (the layer's Param.grad views).
    """
    x, w = cache.x, cache.w
    dw = np.matmul(x.T, dout, out=dw_out)  # (D, N) @ (N, O) -> (D, O)
    db = colsum(dout)
    if db_out is not None:
        db_out[...] = db
        db = db_out
    dx = linear_dx(dout, w) if need_dx else None
    return dx, dw, db


SMALL_BATCH = 16  # rows of dout up to which linear_dx goes block by block (faster there: see linear_dx)
SMALL_GEMM = 1 << 19  # rows x block x out_features of one block product: OpenBLAS's small-matrix kernels' range


def linear_dx(dout: np.ndarray, w: np.ndarray) -> np.ndarray:
    """dx = dout @ w.T, (N, O) @ (O, D) -> (N, D). For a few rows (N <= SMALL_BATCH), one product per block of
    w's rows, each small enough (N x rows x O <= SMALL_GEMM) for OpenBLAS's small-matrix kernels where it has them
    (AVX-512), which skip packing w, the plain product's main cost for so few rows (faster with the AVX2 kernels too).
    For more rows the plain product is as fast or faster. Chosen by
    shape alone, so the bits never depend on the thread count."""
    n, o = dout.shape
    if n > SMALL_BATCH:
        return dout @ w.T
    d = w.shape[0]
    rows = max(32, SMALL_GEMM // (n * o) // 32 * 32)
    dx = np.empty((n, d), np.result_type(dout, w))
    for k in range(0, d, rows):
        np.matmul(dout, w[k:k + rows].T, out=dx[:, k:k + rows])
    return dx


def flatten_forward(x: np.ndarray) -> tuple[np.ndarray, FlattenCache]:
    """(N, H, W, C) -> (N, H*W*C) in NHWC order (a view when x is contiguous)."""
    return x.reshape(x.shape[0], -1), FlattenCache(x.shape)  # (N, H*W*C)


def flatten_backward(dout: np.ndarray, cache: FlattenCache) -> np.ndarray:
    return dout.reshape(cache.x_shape)  # (N, H*W*C) -> (N, H, W, C)
