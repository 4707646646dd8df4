"""A run folder on a full disk: a real small filesystem (tmpfs, mounted by the test as root), `dptrain train` in a
child process. Nothing is lost that was on disk, the errors are one line each with the bytes needed and free, the
training goes on, and the exit code says whether the end of the run reached the disk."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distutil import cli_args, params

from dptrain import checkpoint


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free."""
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def train(data: Path, out: Path, epochs: int) -> subprocess.Popen:
    args = cli_args(data, out, train__epochs=epochs, train__steps_per_epoch=3)
    return subprocess.Popen([sys.executable, "-m", "dptrain", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(120)
def test_full_disk_from_the_start_keeps_training_and_exits_non_zero_in_one_line(tiny_data, small_fs):
    out = small_fs / "run"
    out.mkdir()
    fill(small_fs, 100_000)  # less than one checkpoint of the tiny model (~330 kB)
    proc = train(tiny_data, out, 3)
    log, _ = proc.communicate(timeout=100)
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    assert "two checkpoints need about" in log  # the start-up warning
    errors = [ln for ln in log.splitlines() if "cannot write the checkpoint" in ln]
    assert len(errors) >= 3 and all("are free" in ln and "needs about" in ln and "Errno" not in ln for ln in errors), log
    assert "training goes on" in errors[0]
    assert "epoch 3:" in log  # every epoch trained
    assert log.strip().splitlines()[-1].startswith("dptrain train: training finished but its last checkpoint")
    assert not list(out.glob(".*.tmp"))  # no half-written temp file left behind


@pytest.mark.timeout(120)
def test_space_that_comes_back_gets_the_checkpoints_written_again(tiny_data, small_fs, tmp_path):
    out = small_fs / "run"
    ref = tmp_path / "ref"
    with train(tiny_data, ref, 4) as p:  # the same run on a roomy disk
        assert p.wait(100) == 0, p.stdout.read()
    out.mkdir()
    filler = fill(small_fs, 100_000)
    proc = train(tiny_data, out, 4)
    deadline = time.monotonic() + 60
    seen = ""
    while "cannot write the checkpoint" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    filler.unlink()  # space comes back
    rest, _ = proc.communicate(timeout=100)
    log = seen + rest
    assert proc.returncode == 0, log
    assert "checkpoints are saved again" in log
    assert np.array_equal(params(out), params(ref))  # nothing lost: the same weights as the undisturbed run
    checkpoint.load(out / "best.npz")
