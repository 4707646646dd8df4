"""Max and average pooling over NHWC, any kernel k and stride s (no padding, floor mode like PyTorch).

x: (N, H, W, C) -> out: (N, OH, OW, C), OH = (H - k) // s + 1. Each of the k*k window taps is one strided view
x[:, i::s, j::s, :] of shape (N, OH, OW, C), so pooling is k*k elementwise passes with no reshapes or transposes.
Max pooling records, per output, the index (uint8, row-major in the window) of the first maximum, which is the
element PyTorch routes the gradient to when a window has ties.
"""
from __future__ import annotations

import numpy as np

from .functional import Workspace, scratch


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


def maxpool2d_forward(x: np.ndarray, k: int = 2, stride: int | None = None, ws: Workspace | None = None):
    """x: (N, H, W, C) -> out (N, OH, OW, C), cache (argmax index per output, x shape, k, s)."""
    s = stride or k
    N, H, W, C, OH, OW = _geometry(x, k, s)
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
    return out, (idx, x.shape, k, s)


def maxpool2d_backward(dout: np.ndarray, cache: tuple, ws: Workspace | None = None) -> np.ndarray:
    """dout: (N, OH, OW, C) -> dx (N, H, W, C): dout routed to each window's recorded argmax."""
    idx, x_shape, k, s = cache
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


def avgpool2d_forward(x: np.ndarray, k: int = 2, stride: int | None = None, ws: Workspace | None = None):
    """x: (N, H, W, C) -> out (N, OH, OW, C) = mean of each k x k window."""
    s = stride or k
    N, H, W, C, OH, OW = _geometry(x, k, s)
    out = scratch(ws, "pool.out", (N, OH, OW, C), x.dtype)
    out[...] = _tap(x, 0, 0, s, OH, OW)
    for t in range(1, k * k):
        out += _tap(x, t // k, t % k, s, OH, OW)
    out *= 1.0 / (k * k)
    return out, (x.shape, k, s)


def avgpool2d_backward(dout: np.ndarray, cache: tuple, ws: Workspace | None = None) -> np.ndarray:
    """dout: (N, OH, OW, C) -> dx (N, H, W, C): each window element gets dout / k^2."""
    x_shape, k, s = cache
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
