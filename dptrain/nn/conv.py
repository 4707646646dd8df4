"""2-D convolution as im2col + one GEMM, in NHWC (see functional.py for the layout conventions).

x: (N, H, W, C), w: (kh, kw, C, F), b: (F,) or None, out: (N, OH, OW, F) with
OH = (H + 2*pad - kh) // stride + 1 (likewise OW), i.e. PyTorch's Conv2d(padding=pad, stride=stride) semantics.

im2col fills a (N, OH, OW, kh, kw, C) buffer with ONE copy from a 6-D strided window view of a padded copy of x
(whose zero border is written once, when the buffer is created, and reused). numpy merges the (kw, C) axes of that
view into contiguous runs of kw*C floats: much faster than kh*kw per-tap slice copies. The buffer's
(N*OH*OW, kh*kw*C) view times w viewed as (kh*kw*C, F) is the NHWC output.

Input gradient: for stride 1 (every conv of the default model) dx is itself a stride-1 convolution of dout with the
spatially flipped, channel-transposed kernel and padding k-1-pad, so it reuses the fast im2col + one GEMM (same
FLOPs as dout @ w.T) instead of col2im's kh*kw strided read-modify-write adds. Other strides use col2im (the
adjoint of im2col: kh*kw strided adds into a zeroed padded buffer).

Algorithm: `algo` = "im2col" (the reference), "winograd" (winograd.py's F(2x2, 3x3) where it applies: 3x3, stride 1,
pad 1; im2col otherwise) or "auto" (`choose_algo`: by the layer's shape alone, never by timing or thread count, so
every process of a distributed run and its replay take the same path for the same layer).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..config import CONV_ALGOS
from .functional import colsum
from .threads import split_rows
from .winograd import WinoCache, supported, winograd_backward, winograd_forward
from .workspace import Workspace, scratch

ALGOS = CONV_ALGOS
WINOGRAD_MIN_CHANNELS = 32  # auto: Winograd when the input has at least this many channels (see choose_algo)


def choose_algo(algo: str, w_shape: tuple[int, ...], stride: int, pad: int) -> str:
    """"im2col" or "winograd" for a layer of this shape. "auto" looks at the kernel, stride, padding and input
    channels only (not the input, whose batch differs between uneven shards, nor the threads): Winograd for every
    3x3 stride-1 pad-1 conv with at least WINOGRAD_MIN_CHANNELS input channels, so every 3x3 conv of the default
    model but the first. Winograd saves most where many channels share few tiles; its transforms are memory-bound
    and scale worse over threads than one large GEMM, and a 3-channel layer (a 27-term GEMM) has little to save, so
    it is slower there. The threshold of 32 favours a worker of `launch` (one thread per core) over one process on
    all cores, where it is about even with 64 (figures: docs/performance-notes.md)."""
    if algo not in ALGOS:
        raise ValueError(f"conv algo must be one of {ALGOS}, got {algo!r}")
    kh, kw, C, _ = w_shape
    if algo == "im2col" or not supported(kh, kw, stride, pad):
        return "im2col"
    if algo == "winograd" or C >= WINOGRAD_MIN_CHANNELS:
        return "winograd"
    return "im2col"


class ConvCache(NamedTuple):
    x_shape: tuple[int, int, int, int]  # (N, H, W, C)
    cols: np.ndarray  # (N*OH*OW, kh*kw*C) im2col rows: a workspace buffer, or x itself for a 1x1 stride-1 conv
    w: np.ndarray  # (kh, kw, C, F)
    has_bias: bool
    stride: int
    pad: int


def _out_size(h: int, k: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def conv2d_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1, pad: int = 0,
                   ws: Workspace | None = None, tag: str = "conv", algo: str = "im2col",
                   ) -> tuple[np.ndarray, ConvCache | WinoCache]:
    """x: (N, H, W, C), w: (kh, kw, C, F), b: (F,) | None -> out (N, OH, OW, F), cache.

    tag: prefix of the workspace buffers (the backward pass runs a second convolution under another tag).
    algo: "im2col", "winograd" or "auto" (see choose_algo)."""
    N, H, W, C = x.shape
    kh, kw, C2, F = w.shape
    if C2 != C:
        raise ValueError(f"conv2d: x has {C} channels, w expects {C2}")
    OH, OW = _out_size(H, kh, stride, pad), _out_size(W, kw, stride, pad)
    if OH < 1 or OW < 1:
        raise ValueError(f"conv2d: input {H}x{W} too small for kernel {kh}x{kw} with pad {pad}")
    if choose_algo(algo, w.shape, stride, pad) == "winograd":
        return winograd_forward(x, w, b, ws)
    M, K = N * OH * OW, kh * kw * C
    if pad:
        # zero border written when the buffer is created; only the interior is overwritten afterwards
        xp = scratch(ws, f"{tag}.xp", (N, H + 2 * pad, W + 2 * pad, C), x.dtype, zero_new=True)

        def fill(lo, hi):
            xp[lo:hi, pad:pad + H, pad:pad + W, :] = x[lo:hi]
        split_rows(fill, N, x.size)
    else:
        xp = x
    if kh == kw == 1 and stride == 1:
        cols = xp.reshape(M, K)  # (N*H*W, C): the input itself (a view when x is contiguous)
    else:
        cols6 = scratch(ws, f"{tag}.cols", (N, OH, OW, kh, kw, C), x.dtype)
        xp = np.ascontiguousarray(xp)
        s0, s1, s2, s3 = xp.strides
        windows = as_strided(xp, shape=(N, OH, OW, kh, kw, C), strides=(s0, s1 * stride, s2 * stride, s1, s2, s3),
                             writeable=False)  # windows[n, oh, ow, i, j, c] = xp[n, oh*stride + i, ow*stride + j, c]

        def copy(lo, hi):
            np.copyto(cols6[lo:hi], windows[lo:hi])
        split_rows(copy, N, cols6.size)
        cols = cols6.reshape(M, K)  # (N*OH*OW, kh*kw*C)
    out = scratch(ws, f"{tag}.out", (N, OH, OW, F), x.dtype)
    np.matmul(cols, w.reshape(K, F), out=out.reshape(M, F))  # (M, K) @ (K, F) -> (M, F) == NHWC out
    if b is not None:
        out += b
    return out, ConvCache(x.shape, cols, w, b is not None, stride, pad)


def conv2d_backward(dout: np.ndarray, cache: ConvCache | WinoCache, need_dx: bool = True, ws: Workspace | None = None,
                    dw_out: np.ndarray | None = None, db_out: np.ndarray | None = None):
    """dout: (N, OH, OW, F) -> dx (N, H, W, C) | None, dw (kh, kw, C, F), db (F,) | None.

    need_dx=False skips the input gradient (the first layer of a network). dw_out / db_out: arrays to write the
    gradients into (the layer's Param.grad views); without them new arrays are returned. dx may be a view into
    a workspace buffer (the interior of the padded gradient).
    """
    if isinstance(cache, WinoCache):
        return winograd_backward(dout, cache, need_dx, ws, dw_out, db_out)
    N, H, W, C = cache.x_shape
    w, stride, pad = cache.w, cache.stride, cache.pad
    kh, kw, _, F = w.shape
    OH, OW = dout.shape[1], dout.shape[2]
    M, K = N * OH * OW, kh * kw * C
    dout2 = dout.reshape(M, F)  # (N*OH*OW, F); copies only if dout is a strided view
    dw2 = np.matmul(cache.cols.T, dout2, out=None if dw_out is None else dw_out.reshape(K, F))  # (K, M) @ (M, F)
    dw = dw2.reshape(kh, kw, C, F) if dw_out is None else dw_out
    db = None
    if cache.has_bias:
        db = colsum(dout2)  # (F,)
        if db_out is not None:
            db_out[...] = db
            db = db_out
    if not need_dx:
        return None, dw, db
    if kh == kw == 1 and stride == 1 and pad == 0:
        dx = scratch(ws, "conv.dx", (N, H, W, C), dout.dtype)
        np.matmul(dout2, w.reshape(K, F).T, out=dx.reshape(M, K))  # (M, F) @ (F, C) -> (N*H*W, C)
        return dx, dw, db
    if stride == 1 and pad <= min(kh, kw) - 1 and kh == kw:
        w_t = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))  # (kh, kw, F, C), flipped in space
        dx, _ = conv2d_forward(dout, w_t, None, 1, kh - 1 - pad, ws, tag="convT")  # (N, H, W, C)
        return dx, dw, db
    dcols = scratch(ws, "conv.dcols", (M, K), dout.dtype)
    np.matmul(dout2, w.reshape(K, F).T, out=dcols)  # (M, F) @ (F, K) -> (M, K)
    dcols6 = dcols.reshape(N, OH, OW, kh, kw, C)
    dxp = scratch(ws, "conv.dxp", (N, H + 2 * pad, W + 2 * pad, C), dout.dtype)
    dxp.fill(0)
    hs, ws_ = stride * (OH - 1) + 1, stride * (OW - 1) + 1
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + hs:stride, j:j + ws_:stride, :] += dcols6[:, :, :, i, j, :]  # (N, OH, OW, C)
    return dxp[:, pad:pad + H, pad:pad + W, :], dw, db  # (N, H, W, C) view of the interior
