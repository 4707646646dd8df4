"""The thread pool for non-GEMM kernels, and the OpenBLAS busy-wait adjustment that lets it use the cores.

Kernels (conv.py, norm.py, pool.py) call `split_rows`; a process calls `match_blas_threads` once before training.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController, threadpool_info

# Threads for the non-GEMM work: `set_threads(n)` with n > 1 splits the im2col / padding copies (conv.py), the
# elementwise passes of BatchNorm (norm.py) and 2x2 max-pooling (pool.py) into n contiguous row blocks run
# concurrently (numpy releases the GIL on large arrays). Reductions (BN moments, colsum, coldot) stay in the calling
# thread: splitting them costs more than it saves, and only elementwise work is split, so results are bitwise
# identical for every thread count. ReLU and the residual add are too small a part of a step to gain from a split.
# Default 1: everything runs in the calling thread.
_threads = 1
_pool: ThreadPoolExecutor | None = None
_blas: ThreadpoolController | None = None  # each_thread's BLAS limit (a cached controller: far cheaper per limit than a new one)
_busy = False  # each_thread's fan-out is running: every thread already has work, split_rows runs inline
_short_spin = True  # match_blas_threads(short_spin=False) (config train.short_blas_spin) keeps OpenBLAS's wait
PAR_MIN_ELEMS = 1 << 16  # below this a kernel runs in the calling thread (there the pool hand-off costs more than it saves)


# OpenBLAS worker threads busy-wait for 2**28 cycles after each parallel GEMM before sleeping, i.e. through
# every non-GEMM kernel between two GEMMs, taking the second core from our pool thread, which then gains nothing.
# With threads > 1 we shorten that wait to 2**16 cycles unless the user set OPENBLAS_THREAD_TIMEOUT.
_BLAS_SPIN_SHORT = 16
_BLAS_SPIN_DEFAULT = 28  # OpenBLAS's compiled-in THREAD_TIMEOUT


def _openblas_spin(log2_cycles: int) -> None:
    """Set OpenBLAS's thread timeout (as OPENBLAS_THREAD_TIMEOUT would at start-up): re-read it from the environment
    through `openblas_read_env`, then stop the idle worker threads, which the next parallel GEMM restarts with the
    new timeout. GEMM results do not depend on it. Any failure (not OpenBLAS, symbols missing) leaves things as they
    are. Must not run while another thread is inside BLAS."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or "GOTO_THREAD_TIMEOUT" in os.environ:
        return  # the user's choice
    try:
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
    if (n > 1) != (prev > 1) and _short_spin:
        _openblas_spin(_BLAS_SPIN_SHORT if n > 1 else _BLAS_SPIN_DEFAULT)
    _threads = n
    return prev


def match_blas_threads(short_spin: bool = True) -> None:
    """set_threads(the BLAS thread limit in force): a process with k BLAS threads runs its copies and BatchNorm /
    max-pool passes on k threads too. Call once the process's BLAS limit is settled, before the first step.
    short_spin=False leaves OpenBLAS's post-GEMM busy-wait as it is (config `train.short_blas_spin`)."""
    global _short_spin
    _short_spin = short_spin
    n = min((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=1)
    set_threads(n)


def split_rows(fn: Callable[[int, int], None], n: int, elems: int) -> None:
    """Run fn(lo, hi) over [0, n) in set_threads()'s number of contiguous blocks concurrently (the caller runs the first),
    or as one fn(0, n) when single-threaded, when the kernel touches fewer than PAR_MIN_ELEMS elements, or inside
    each_thread's threads (they already fill the pool). fn must only write rows lo:hi of its outputs, and must not
    call split_rows itself (the pool is not reentrant)."""
    t = min(_threads, n)
    if t <= 1 or elems < PAR_MIN_ELEMS or _busy:
        fn(0, n)
        return
    bounds = [n * i // t for i in range(t + 1)]
    _fan_out(fn, [(bounds[i], bounds[i + 1]) for i in range(t)])


def _fan_out(fn: Callable, calls: list[tuple]) -> None:
    """fn(*calls[0]) in this thread and the other calls on the pool at the same time; returns when all are done (the
    first exception raised, after every call has finished)."""
    futs = [_pool.submit(fn, *args) for args in calls[1:]]
    try:
        fn(*calls[0])
    finally:
        for f in futs:
            f.result()


def threads() -> int:
    """The number of threads set_threads() set."""
    return _threads


def each_thread(fn: Callable[[int], None], n: int) -> None:
    """fn(t) for t in range(min(n, threads)) concurrently (the caller runs t = 0), with BLAS limited to one thread
    while they run: each fn does its own GEMMs on its own part of the work (whole independent items, e.g. a
    convolution's chunks of images), no nested parallelism (their split_rows run inline). One thread (or n = 1):
    fn(0) alone, BLAS untouched, its split_rows over the threads.
    Each fn's GEMMs run on one BLAS thread, as a one-thread process's do, so the bits are one thread's; a GEMM's own
    bits can change with the BLAS thread count (OpenBLAS's AVX2 kernels: make test-avx2), so the bits of the fn(0)
    path with several BLAS threads need not be (tests/test_winograd.py checks the layers on 1 and 2 threads)."""
    global _blas, _busy
    t = min(_threads, n)
    if t <= 1:
        fn(0)
        return
    if _blas is None:
        _blas = ThreadpoolController()
    with _blas.limit(limits=1, user_api="blas"):
        _busy = True
        try:
            _fan_out(fn, [(i,) for i in range(t)])
        finally:
            _busy = False


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gemm_signature() -> str:
    """What decides a float32 GEMM's bits in this process: the CPU model, and each BLAS library's name, version,
    kernel set (OpenBLAS's core type) and thread count. Processes with equal signatures compute equal bits for
    equal GEMM calls; different ones may not (docs/reproducibility.md)."""
    import numpy  # noqa: F401 - loads the BLAS that threadpoolctl reports
    libs = sorted((i.get("internal_api", ""), i.get("version") or "", i.get("architecture") or "",
                   int(i.get("num_threads") or 0)) for i in threadpool_info() if i.get("user_api") == "blas")
    return json.dumps([cpu_model(), libs])

