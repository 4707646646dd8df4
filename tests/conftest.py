"""Session fixtures shared by the distributed tests."""
from __future__ import annotations

import pytest


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
