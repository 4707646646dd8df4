"""Session fixtures shared by the distributed tests, and the environment every test runs in.

A test's outcome must not depend on the shell it is run from. At session start this removes the variables that
change what the code under test does or what a test expects: thread counts and binding (OMP_*, OPENBLAS_*, MKL_*,
GOTO_*, KMP_*), NumPy's other knobs (NPY_*), dptrain's own (DPTRAIN_*) and the rank variables of mpirun, Slurm and
torchrun (rankenv.py reads them). Each test then starts in the repository root, whatever directory pytest was
started from.

Kept: kernels.KERNEL_VARS, the variables that choose which SIMD kernels OpenBLAS, NumPy, MKL and PyTorch run
(`make test-avx2`'s OPENBLAS_CORETYPE=Haswell, NPY_DISABLE_CPU_FEATURES, ...). They must reach the code under test
and every process a test starts (workers inherit them; the launcher forwards OPENBLAS_*, MKL_* and NPY_* to the
hosts), and a test that asserts about forwarded variables counts them in (kernels.kernel_env()). Kept too: the
suite's own switches (SUITE_VARS). Under DPTRAIN_TEST_KERNELS=avx2 (set by `make test-avx2`) the session refuses
to start unless OpenBLAS and NumPy really run their AVX2 kernels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from kernels import KERNEL_VARS, active, avx2_problem, kernel_env

ROOT = Path(__file__).resolve().parent.parent

SUITE_VARS = ("DPTRAIN_REQUIRE_NETNS", "DPTRAIN_NETNS_TEST_DIR", "DPTRAIN_TEST_KERNELS")
CLEARED_PREFIXES = ("OMP_", "OPENBLAS_", "GOTO_", "MKL_", "KMP_", "NPY_", "DPTRAIN_", "OMPI_", "PMI_", "PMIX_",
                    "SLURM_", "TORCHELASTIC_")
CLEARED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # what OpenBLAS reads at load


def _clean_environment() -> list[str]:
    """Remove what the caller's shell may have set (see the module docstring); returns the names removed."""
    gone = [k for k in os.environ if (k.startswith(CLEARED_PREFIXES) or k in CLEARED)
            and k not in KERNEL_VARS and k not in SUITE_VARS]
    for k in gone:
        del os.environ[k]
    return sorted(gone)


_blas_loaded = "numpy" in sys.modules  # then OpenBLAS has read its thread count already
if set(_clean_environment()) & set(THREAD_VARS) and _blas_loaded:  # give it a fresh process's count
    from threadpoolctl import threadpool_limits
    threadpool_limits(len(os.sched_getaffinity(0)), user_api="blas")


def pytest_report_header(config):
    arch, simd = active()
    return [f"kernels: OpenBLAS {', '.join(arch) or 'not loaded'}; NumPy SIMD targets in use: {' '.join(simd)}; "
            f"{' '.join(f'{k}={v}' for k, v in kernel_env().items()) or 'no kernel variables set'}"]


def pytest_configure(config):
    """DPTRAIN_TEST_KERNELS=avx2 (`make test-avx2`): stop before any test unless OpenBLAS and NumPy really run their
    AVX2 kernels (a NumPy or OpenBLAS that renamed its targets would otherwise run the pass on AVX-512 and prove
    nothing)."""
    want = os.environ.get("DPTRAIN_TEST_KERNELS")
    if not want:
        return
    problem = avx2_problem() if want == "avx2" else "only 'avx2' is known"
    if problem:
        pytest.exit(f"DPTRAIN_TEST_KERNELS={want}: {problem}", returncode=4)


@pytest.fixture(autouse=True)
def _in_repository_root(monkeypatch):
    """Every test starts in the repository root (the launcher reads ./.dptrain_env, configs/ are relative)."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 synthetic people, 20-40 images each, 32x32 (≈ 210 images, 169 train / 42 val): generated once."""
    from dptrain.data.synth import generate
    root = tmp_path_factory.mktemp("tinydata")
    generate(root / "synth", num_classes=8, num_rich=8, image_size=32, max_images=40, min_rich=20, progress=False)
    return root / "synth"


# The quick tier (`make check`: pytest -m "not slow") leaves out the tests that start processes, train, or time real
# work: the whole files below, and the slow tests of otherwise fast files (node-id prefixes). Chosen from measured
# durations (docs/contributing.md); a new test file is in the quick tier until it is listed here.
SLOW_FILES = {
    "test_batch_invariant.py", "test_bench.py", "test_bench_hosts.py", "test_bench_tta.py", "test_cli.py",
    "test_disk_full.py", "test_dist_equivalence.py", "test_dist_factored.py", "test_dist_faults.py",
    "test_dist_launch.py", "test_dist_update.py", "test_ema.py", "test_launch_conventions.py",
    "test_local_security.py", "test_localsum.py", "test_mesh.py", "test_multihost.py", "test_netns_cluster.py",
    "test_replay.py", "test_soak.py", "test_train.py",
}
SLOW_TESTS = (
    "test_plan.py::test_cli_",  # `dptrain plan` in a subprocess, each with its imports
    "test_plan.py::test_calibrate",  # times the real model
    "test_plan.py::test_plot_validation",  # matplotlib
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.rsplit("/", 1)[-1]
        if name.split("::", 1)[0] in SLOW_FILES or name.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
