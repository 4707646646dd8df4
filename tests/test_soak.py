"""`dptrain soak`: a short memory soak and two fault trials (kill -9 of a worker, SIGINT of the launcher) of the tiny
model, run as a user runs them, plus the checks' arithmetic on made-up samples."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import pytest
from distutil import ROOT, TINY, wait_until, workers_of

from dptrain.data.shm import leftover_segments
from dptrain.soak.memory import analyse
from dptrain.soak.runs import plan_epochs

MB = 2**20


def soak(tmp_path, data, *args, timeout_s: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dptrain", "soak", "--workers", "2", "--batch-size", "16", "--config", str(TINY),
           "--data", str(data), f"--data.cache_dir={data.parent / 'cache'}", "--data.min_images_per_class=10",
           "--train.tensorboard=false", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.timeout(40)
def test_memory_soak_short_run(tiny_data, tmp_path):
    out = tmp_path / "mem"
    # 40 tiny steps took 1.2 s on a fast machine: too short for samples every 0.2 s after the warm-up; sample often
    p = soak(tmp_path, tiny_data, "--steps", "120", "--interval", "0.05", "--out", str(out), "--timeout", "30",
             timeout_s=35)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "soak.json").read_text())
    assert r["passed"] and r["failures"] == []
    assert r["steps_done"] == r["steps_expected"] == 120 and r["rc"] == 0
    assert r["dropped_messages"] == 0 and r["leftovers"] == []
    assert set(r["processes"]) == {"launcher", "rank0", "rank1"}
    for proc in r["processes"].values():
        assert proc["uss_mb_first"] > 5 and proc["pss_mb_first"] > 5
        assert abs(proc["uss_growth_pct"]) <= 5 and proc["fds_constant"]
    assert r["fds_constant"] and r["shm"]["constant"] and r["shm"]["count_max"] >= 3
    assert (out / "soak.png").stat().st_size > 10_000
    assert not leftover_segments(r["run_id"])


@pytest.mark.timeout(50)
def test_fault_trials_kill_and_int_complete_and_leave_nothing(tiny_data, tmp_path):
    out = tmp_path / "faults"
    p = soak(tmp_path, tiny_data, "--faults", "2", "--kinds", "kill,int", "--cycle", "--trial-steps", "30",
             "--trial-timeout", "20", "--out", str(out), timeout_s=45)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "faults.json").read_text())
    assert (r["passed"], r["failed"]) == (2, 0)
    kill, intr = r["trials"]
    assert kill["fault"] == "kill" and kill["replaced"] >= 1 and kill["rc"] == [0] and kill["steps"] == 30
    assert intr["fault"] == "int" and intr["rc"] == [130, 0] and intr["steps"] == 30
    for t in r["trials"]:
        assert t["outcome"] == "ok" and t["problems"] == []
        for rid in t["run_ids"]:
            assert not leftover_segments(rid)
            assert wait_until(lambda rid=rid: not workers_of(rid), 2.0)
    assert "trial  fault" in p.stdout and "2/2 trials passed" in p.stdout


def test_plan_epochs_splits_the_steps_exactly():
    assert plan_epochs(2000, 50) == (40, 50)
    assert plan_epochs(40, 10) == (4, 10)
    assert plan_epochs(60, 7) == (10, 6)
    e, s = plan_epochs(97, 10)  # prime: one step per epoch would do, but it takes the first exact split
    assert e * s == 97 and s <= 10


def _samples(uss_of, fds_of=lambda i: 20, shm=lambda i: 6, n=50, total=100):
    return [{"t": float(i), "steps": 1 + 2 * i if i < n - 1 else total, "shm_count": shm(i), "shm_bytes": shm(i) * MB,
             "procs": {"launcher": {"pid": 1, "uss": 50 * MB, "pss": 60 * MB, "fds": 20, "threads": 5},
                       "rank0": {"pid": 2, "uss": uss_of(i), "pss": uss_of(i) + 10 * MB, "fds": fds_of(i),
                                 "threads": 4}}}
            for i in range(n)]


def test_analyse_flags_growth_fd_and_shm_leaks_and_passes_flat_runs():
    args = Namespace(warmup=0.2, max_growth=5.0, slack_mb=2.0, workers=1)
    procs, shm, failures = analyse(_samples(lambda i: (100 + (i % 3)) * MB), 100, args)  # flat, with noise
    assert failures == [] and shm["constant"] and procs["rank0"]["fds_constant"]
    _, _, failures = analyse(_samples(lambda i: (100 + i) * MB), 100, args)  # 1 MiB a second
    assert len(failures) == 2 and all(f.startswith("rank0: ") and "grew" in f for f in failures)
    _, _, failures = analyse(_samples(lambda i: 100 * MB, fds_of=lambda i: 20 + i // 10), 100, args)
    assert failures == ["rank0: open fds went from 21 to 24 after warm-up"]
    _, _, failures = analyse(_samples(lambda i: 100 * MB, shm=lambda i: 6 + (i == 30)), 100, args)
    assert len(failures) == 1 and failures[0].startswith("shared memory changed during training: 6-7 segments")


def test_warm_up_lasts_past_the_first_epoch():
    from dptrain.soak.memory import training_span
    samples = _samples(lambda i: 100 * MB)  # steps 1, 3, 5, ...: step 61 is at t = 30
    assert training_span(samples, 100, 0.2) == pytest.approx((0.0, 9.6, 48.0))
    assert training_span(samples, 100, 0.2, epoch_steps=60) == (0.0, 30.0, 48.0)


def test_a_plateau_at_the_end_is_not_a_leak():
    args = Namespace(warmup=0.2, max_growth=5.0, slack_mb=2.0, workers=1)
    procs, _, failures = analyse(_samples(lambda i: (160 if i in (45, 46, 47) else 100) * MB), 100, args)
    assert failures == []  # the median of the end window is up 60 %, its floor is not
    assert procs["rank0"]["uss_growth_pct"] > 50 and procs["rank0"]["uss_floor_growth_pct"] == 0
