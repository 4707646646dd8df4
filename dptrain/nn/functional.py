"""Elementwise and dense kernels, plus the scratch-buffer `Workspace` every kernel module shares.

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

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Threads for the non-GEMM work: `set_threads(n)` with n > 1 splits the im2col / padding copies (conv.py), the
# elementwise passes of BatchNorm (norm.py) and 2x2 max-pooling (pool.py) into n contiguous row blocks run
# concurrently (numpy releases the GIL on large arrays). Reductions (BN moments, colsum, coldot) stay in the calling
# thread: splitting them was measured slower here, and only elementwise work is split, so results are bitwise
# identical for every thread count. ReLU and the residual add were measured too small to gain (~1 % of a step).
# Default 1: everything runs in the calling thread, as before.
_threads = 1
_pool: ThreadPoolExecutor | None = None
PAR_MIN_ELEMS = 1 << 16  # below this a kernel runs in the calling thread (pool hand-off costs ~10-50 us)


# OpenBLAS worker threads busy-wait for 2**28 cycles (~0.1 s) after each parallel GEMM before sleeping, i.e. through
# every non-GEMM kernel between two GEMMs, taking the second core from our pool thread (measured: no gain at all).
# With threads > 1 we shorten that wait to 2**16 cycles (~25 us) unless the user set OPENBLAS_THREAD_TIMEOUT.
_BLAS_SPIN_SHORT = 16
_BLAS_SPIN_DEFAULT = 28  # OpenBLAS's compiled-in THREAD_TIMEOUT


def _openblas_spin(log2_cycles: int) -> None:
    """Set OpenBLAS's thread timeout (as OPENBLAS_THREAD_TIMEOUT would at start-up): re-read it from the environment
    through `openblas_read_env`, then stop the idle worker threads, which the next parallel GEMM restarts with the
    new timeout. GEMM results do not depend on it. Any failure (not OpenBLAS, symbols missing) leaves things as they
    are. Must not run while another thread is inside BLAS."""
    import ctypes
    import os

    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or "GOTO_THREAD_TIMEOUT" in os.environ:
        return  # the user's choice
    try:
        from threadpoolctl import threadpool_info
        libs = [ctypes.CDLL(i["filepath"]) for i in threadpool_info() if i.get("internal_api") == "openblas"]
        for lib in libs:
            lib.openblas_read_env, lib.blas_thread_shutdown_  # both exist, or AttributeError before any change
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(log2_cycles)
        try:
            for lib in libs:
                lib.openblas_read_env()
        finally:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]  # only OpenBLAS's copy keeps it; child processes do not inherit it
        for lib in libs:
            lib.blas_thread_shutdown_()
    except (ImportError, OSError, AttributeError):
        pass


def set_threads(n: int) -> int:
    """Use n threads (the caller plus n - 1 pool threads) for large non-GEMM kernels; call with the BLAS limit,
    before training, while no other thread is running BLAS. Returns the previous setting."""
    global _threads, _pool
    n, prev = max(1, int(n)), _threads
    if n == _threads:
        return prev
    if _pool is not None:
        _pool.shutdown(wait=True)
    _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="dptrain-nn") if n > 1 else None
    if (n > 1) != (prev > 1):
        _openblas_spin(_BLAS_SPIN_SHORT if n > 1 else _BLAS_SPIN_DEFAULT)
    _threads = n
    return prev


def get_threads() -> int:
    return _threads


def match_blas_threads() -> int:
    """set_threads(the BLAS thread limit in force): a process with k BLAS threads runs its copies and BatchNorm /
    max-pool passes on k threads too. Call once the process's BLAS limit is settled, before the first step."""
    from threadpoolctl import threadpool_info
    n = min((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=1)
    set_threads(n)
    return n


def split_rows(fn: Callable[[int, int], None], n: int, elems: int) -> None:
    """Run fn(lo, hi) over [0, n) in get_threads() contiguous blocks concurrently (the caller runs the first),
    or as one fn(0, n) when single-threaded or when the kernel touches fewer than PAR_MIN_ELEMS elements.
    fn must only write rows lo:hi of its outputs, and must not call split_rows itself (the pool is not reentrant)."""
    t = min(_threads, n)
    if t <= 1 or elems < PAR_MIN_ELEMS:
        fn(0, n)
        return
    bounds = [n * i // t for i in range(t + 1)]
    futs = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, t)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        for f in futs:
            f.result()


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

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())


def scratch(ws: Workspace | None, tag: str, shape: tuple[int, ...], dtype, zero_new: bool = False) -> np.ndarray:
    """A buffer from `ws`, or a fresh one when there is no workspace."""
    if ws is None:
        return np.zeros(shape, dtype) if zero_new else np.empty(shape, dtype)
    return ws.get(tag, shape, dtype, zero_new)


def widen(a: np.ndarray) -> tuple[np.ndarray, int]:
    """View a C-contiguous (M, C) array as (M/k, k*C) with k*C around 2048, returning (view, k).

    Per-channel reductions and (C,)-vector broadcasts over (M, C) with small C run numpy's inner loop C elements at
    a time; on the wide view the loops are k times longer (measured 2-4x faster here). Row sums of the wide view
    then fold back with `.reshape(k, C).sum(0)`. Every accumulator sums only M/k terms, which also keeps float32
    sums accurate (~1e-7 relative here, against ~1e-5 for a naive column sum).
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


def tiled(v: np.ndarray, k: int) -> np.ndarray:
    """A (C,) vector repeated k times, to broadcast against the (M/k, k*C) view of widen()."""
    return np.tile(v, k)


def relu_forward(x: np.ndarray, ws: Workspace | None = None) -> tuple[np.ndarray, np.ndarray]:
    """out = max(x, 0). x: any shape. cache: out (its sign is the derivative)."""
    out = scratch(ws, "relu.out", x.shape, x.dtype)
    np.maximum(x, 0, out=out)
    return out, out


def relu_backward(dout: np.ndarray, cache: np.ndarray, ws: Workspace | None = None) -> np.ndarray:
    """dx = dout * (out > 0); sign(out) is that mask as floats, computed in one SIMD pass (out >= 0)."""
    out = cache
    dx = scratch(ws, "relu.dx", out.shape, out.dtype)
    np.sign(out, out=dx)  # 1 where out > 0, 0 where out == 0
    dx *= dout
    return dx


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, tuple]:
    """out = x @ w + b. x: (N, D), w: (D, O), b: (O,) or None -> out (N, O)."""
    out = x @ w  # (N, O)
    if b is not None:
        out += b
    return out, (x, w)


def linear_backward(dout: np.ndarray, cache: tuple, need_dx: bool = True, dw_out: np.ndarray | None = None,
                    db_out: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout: (N, O) -> dx (N, D) (None if not need_dx), dw (D, O), db (O,).

    dw_out / db_out: optional arrays the gradients are written into (the layer's Param.grad views).
    """
    x, w = cache
    dw = np.matmul(x.T, dout, out=dw_out)  # (D, N) @ (N, O) -> (D, O)
    db = colsum(dout)
    if db_out is not None:
        db_out[...] = db
        db = db_out
    dx = dout @ w.T if need_dx else None  # (N, O) @ (O, D) -> (N, D)
    return dx, dw, db


def flatten_forward(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, H, W, C) -> (N, H*W*C) in NHWC order (a view when x is contiguous)."""
    return x.reshape(x.shape[0], -1), x.shape  # (N, H*W*C)


def flatten_backward(dout: np.ndarray, cache: tuple[int, ...]) -> np.ndarray:
    return dout.reshape(cache)  # (N, H*W*C) -> (N, H, W, C)
