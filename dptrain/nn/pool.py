"""Max and average pooling over NHWC, any kernel k and stride s (no padding, floor mode like PyTorch).

x: (N, H, W, C) -> out: (N, OH, OW, C), OH = (H - k) // s + 1. Each of the k*k window taps is one strided view
x[:, i::s, j::s, :] of shape (N, OH, OW, C), so pooling is k*k elementwise passes with no reshapes or transposes.
Max pooling records, per output, the index (uint8, row-major in the window) of the first maximum, which is the
element PyTorch routes the gradient to when a window has ties.

The common 2x2 / stride 2 case on even sizes has its own, faster path: reduce column pairs, then row pairs
of the (N, H, W/2, C) result (long contiguous runs), keeping two boolean "second one won" masks instead of indices.
Ties still go to the first element in row-major order: within a row the left one wins, across rows the top one.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .threads import split_rows
from .workspace import Workspace, scratch


class MaxPoolCache(NamedTuple):
    idx: np.ndarray  # (N, OH, OW, C) uint8: row-major index in its window of each output's first maximum
    x_shape: tuple[int, int, int, int]  # (N, H, W, C)
    k: int
    s: int


class MaxPool2x2Cache(NamedTuple):
    right: np.ndarray  # (N, H, W/2, C) bool: the right column of a pair is strictly greater
    lower: np.ndarray  # (N, H/2, W/2, C) bool: the lower row of a pair (of column maxima) is strictly greater
    x_shape: tuple[int, int, int, int]  # (N, H, W, C)


class AvgPoolCache(NamedTuple):
    x_shape: tuple[int, int, int, int]  # (N, H, W, C)
    k: int
    s: int


def _geometry(x: np.ndarray, k: int, s: int):
    N, H, W, C = x.shape
    OH, OW = (H - k) // s + 1, (W - k) // s + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"pool: input {H}x{W} smaller than kernel {k}")
    if k * k > 255:
        raise ValueError("pool: kernel too large for uint8 argmax")
    return N, H, W, C, OH, OW


def _tap(a: np.ndarray, i: int, j: int, s: int, OH: int, OW: int) -> np.ndarray:
    """The (N, OH, OW, C) strided view of tap (i, j) of every window."""
    return a[:, i:i + s * (OH - 1) + 1:s, j:j + s * (OW - 1) + 1:s, :]


def _tiles(x_shape, k: int, s: int, OH: int, OW: int) -> bool:
    """True when the windows cover x exactly once (k == s, no remainder): dx can be written tap by tap."""
    return k == s and x_shape[1] == OH * s and x_shape[2] == OW * s


def maxpool2d_forward(x: np.ndarray, k: int = 2, stride: int | None = None, ws: Workspace | None = None
                      ) -> tuple[np.ndarray, MaxPoolCache | MaxPool2x2Cache]:
    """x: (N, H, W, C) -> out (N, OH, OW, C), cache (MaxPool2x2Cache on the fast path, else MaxPoolCache)."""
    s = stride or k
    N, H, W, C, OH, OW = _geometry(x, k, s)
    if k == s == 2 and H % 2 == 0 and W % 2 == 0:
        return _maxpool2x2_forward(x, ws)
    out = scratch(ws, "pool.out", (N, OH, OW, C), x.dtype)
    idx = scratch(ws, "pool.idx", (N, OH, OW, C), np.uint8)
    upd = scratch(ws, "pool.mask", (N, OH, OW, C), np.bool_)
    out[...] = _tap(x, 0, 0, s, OH, OW)
    idx.fill(0)
    for t in range(1, k * k):
        v = _tap(x, t // k, t % k, s, OH, OW)
        np.greater(v, out, out=upd)  # strictly greater: the first maximum wins ties
        np.copyto(idx, t, where=upd)
        np.maximum(out, v, out=out)
    return out, MaxPoolCache(idx, x.shape, k, s)


def maxpool2d_backward(dout: np.ndarray, cache: MaxPoolCache | MaxPool2x2Cache,
                       ws: Workspace | None = None) -> np.ndarray:
    """dout: (N, OH, OW, C) -> dx (N, H, W, C): dout routed to each window's recorded argmax."""
    if isinstance(cache, MaxPool2x2Cache):
        return _maxpool2x2_backward(dout, cache, ws)
    idx, x_shape, k, s = cache.idx, cache.x_shape, cache.k, cache.s
    OH, OW = idx.shape[1], idx.shape[2]
    tiles = _tiles(x_shape, k, s, OH, OW)
    dx = scratch(ws, "pool.dx", x_shape, dout.dtype)
    eq = scratch(ws, "pool.mask", idx.shape, np.bool_)
    if not tiles:
        dx.fill(0)
    for t in range(k * k):
        np.equal(idx, t, out=eq)
        view = _tap(dx, t // k, t % k, s, OH, OW)
        if tiles:
            np.multiply(dout, eq, out=view)
        else:
            view += dout * eq
    return dx


def _maxpool2x2_forward(x: np.ndarray, ws: Workspace | None) -> tuple[np.ndarray, MaxPool2x2Cache]:
    N, H, W, C = x.shape
    H2, W2 = H // 2, W // 2
    xr = x.reshape(N, H, W2, 2, C)  # column pairs
    right = scratch(ws, "pool.right", (N, H, W2, C), np.bool_)  # right column strictly greater
    colmax = scratch(ws, "pool.colmax", (N, H, W2, C), x.dtype)
    cr = colmax.reshape(N, H2, 2, W2, C)  # row pairs
    lower = scratch(ws, "pool.lower", (N, H2, W2, C), np.bool_)  # lower row strictly greater
    out = scratch(ws, "pool.out", (N, H2, W2, C), x.dtype)

    def block(lo, hi):  # images lo:hi
        np.greater(xr[lo:hi, :, :, 1], xr[lo:hi, :, :, 0], out=right[lo:hi])
        np.maximum(xr[lo:hi, :, :, 0], xr[lo:hi, :, :, 1], out=colmax[lo:hi])
        np.greater(cr[lo:hi, :, 1], cr[lo:hi, :, 0], out=lower[lo:hi])
        np.maximum(cr[lo:hi, :, 0], cr[lo:hi, :, 1], out=out[lo:hi])
    split_rows(block, N, x.size)
    return out, MaxPool2x2Cache(right, lower, x.shape)


def _maxpool2x2_backward(dout: np.ndarray, cache: MaxPool2x2Cache, ws: Workspace | None) -> np.ndarray:
    right, lower, x_shape = cache.right, cache.lower, cache.x_shape
    N, H, W, C = x_shape
    H2, W2 = H // 2, W // 2
    dcol = scratch(ws, "pool.dcol", (N, H, W2, C), dout.dtype)  # gradient of colmax
    dr = dcol.reshape(N, H2, 2, W2, C)  # (N, H2, 2, W2, C)
    dx = scratch(ws, "pool.dx", x_shape, dout.dtype)
    dxr = dx.reshape(N, H, W2, 2, C)  # (N, H, W2, 2, C)

    def block(lo, hi):  # images lo:hi
        np.multiply(dout[lo:hi], lower[lo:hi], out=dr[lo:hi, :, 1])
        np.subtract(dout[lo:hi], dr[lo:hi, :, 1], out=dr[lo:hi, :, 0])  # exact: d - d = 0, d - 0 = d
        np.multiply(dcol[lo:hi], right[lo:hi], out=dxr[lo:hi, :, :, 1])
        np.subtract(dcol[lo:hi], dxr[lo:hi, :, :, 1], out=dxr[lo:hi, :, :, 0])
    split_rows(block, N, dx.size)
    return dx


def avgpool2d_forward(x: np.ndarray, k: int = 2, stride: int | None = None, ws: Workspace | None = None
                      ) -> tuple[np.ndarray, AvgPoolCache]:
    """x: (N, H, W, C) -> out (N, OH, OW, C) = mean of each k x k window."""
    s = stride or k
    N, H, W, C, OH, OW = _geometry(x, k, s)
    out = scratch(ws, "pool.out", (N, OH, OW, C), x.dtype)
    out[...] = _tap(x, 0, 0, s, OH, OW)
    for t in range(1, k * k):
        out += _tap(x, t // k, t % k, s, OH, OW)
    out *= 1.0 / (k * k)
    return out, AvgPoolCache(x.shape, k, s)


def avgpool2d_backward(dout: np.ndarray, cache: AvgPoolCache, ws: Workspace | None = None) -> np.ndarray:
    """dout: (N, OH, OW, C) -> dx (N, H, W, C): each window element gets dout / k^2."""
    x_shape, k, s = cache.x_shape, cache.k, cache.s
    OH, OW = dout.shape[1], dout.shape[2]
    tiles = _tiles(x_shape, k, s, OH, OW)
    dx = scratch(ws, "pool.dx", x_shape, dout.dtype)
    share = dout * dout.dtype.type(1.0 / (k * k))  # (N, OH, OW, C)
    if not tiles:
        dx.fill(0)
    for t in range(k * k):
        view = _tap(dx, t // k, t % k, s, OH, OW)
        if tiles:
            view[...] = share
        else:
            view += share
    return dx
