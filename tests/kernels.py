"""Which SIMD kernels the suite runs with, and a way to run it with the AVX2 ones on an AVX-512 machine.

    python tests/kernels.py avx2 [pytest arguments]     # what `make test-avx2` runs

sets OPENBLAS_CORETYPE=Haswell (OpenBLAS's AVX2 kernels), NPY_DISABLE_CPU_FEATURES = every SIMD target beyond AVX2
that this NumPy dispatches to (their names change between NumPy versions: X86_V4, AVX512_ICL, AVX512_SPR in 2.4;
AVX512F, AVX512_SKX, ... before), PyTorch's ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
ONEDNN_MAX_CPU_ISA=AVX2 (the oracle's kernels), and DPTRAIN_TEST_KERNELS=avx2, then runs pytest in a fresh process
(the libraries read these once, when loaded). conftest.py stops that session before any test unless OpenBLAS
reports Haswell kernels and NumPy dispatches to no target beyond AVX2.
"""
from __future__ import annotations

import os
import sys

# the variables that choose kernels: conftest.py keeps them, the launcher forwards OPENBLAS_* / MKL_* / NPY_*
KERNEL_VARS = ("OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES", "MKL_ENABLE_INSTRUCTIONS",
               "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
BEYOND_AVX2 = ("AVX512", "X86_V4", "AVX10", "AMX")  # NumPy target names above AVX2 (+FMA3, F16C: X86_V3)


def kernel_env() -> dict[str, str]:
    """The kernel-choosing variables set in this process (none in a plain `make test`)."""
    return {k: os.environ[k] for k in KERNEL_VARS if k in os.environ}


def _numpy_targets() -> tuple[list[str], dict]:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return list(__cpu_dispatch__), dict(__cpu_features__)


def active() -> tuple[list[str], list[str]]:
    """(the architecture of every OpenBLAS loaded here, the SIMD targets NumPy dispatches to on this CPU)."""
    import numpy as np
    from threadpoolctl import threadpool_info
    np.zeros(1)
    dispatch, found = _numpy_targets()
    arch = [i.get("architecture") or "?" for i in threadpool_info() if i.get("internal_api") == "openblas"]
    return arch, [t for t in dispatch if found.get(t)]


def avx2_problem() -> str | None:
    """Why this process does not run the AVX2 kernels, or None when it does."""
    arch, simd = active()
    beyond = [t for t in simd if t.startswith(BEYOND_AVX2)]
    if arch and all(a.lower() == "haswell" for a in arch) and not beyond:
        return None
    return (f"OpenBLAS runs {arch or 'nothing'} kernels and NumPy dispatches to {simd} (OPENBLAS_CORETYPE="
            f"{os.environ.get('OPENBLAS_CORETYPE')!r}, NPY_DISABLE_CPU_FEATURES="
            f"{os.environ.get('NPY_DISABLE_CPU_FEATURES')!r})")


def avx2_env() -> dict[str, str]:
    """The variables that make OpenBLAS, NumPy and PyTorch run their AVX2 kernels on a CPU that has AVX-512."""
    dispatch, _ = _numpy_targets()
    return {"OPENBLAS_CORETYPE": "Haswell",
            "NPY_DISABLE_CPU_FEATURES": " ".join(t for t in dispatch if t.startswith(BEYOND_AVX2)),
            "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "DPTRAIN_TEST_KERNELS": "avx2"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "avx2":
        raise SystemExit("usage: python tests/kernels.py avx2 [pytest arguments]")
    _, found = _numpy_targets()
    if not (found.get("AVX2") and found.get("FMA3")):
        raise SystemExit("tests/kernels.py avx2: this CPU has no AVX2 and FMA: OpenBLAS's Haswell kernels cannot run")
    env = {**os.environ, **avx2_env()}
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *argv[1:]], env)


if __name__ == "__main__":
    main(sys.argv[1:])
