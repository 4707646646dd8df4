"""`dptrain launch` on one host: more workers than cores, BLAS threads per worker, the Chrome-trace timeline."""
from __future__ import annotations

import json

import psutil
import pytest
from distutil import Launch, cli_args, launch_inproc, step_records, tiny_cfg, wait_until, workers_of

from dptrain.data.shm import leftover_segments


@pytest.mark.timeout(120)
def test_eight_workers_one_blas_thread_each(tiny_data, tmp_path):
    """8 workers on this host (2 cores here): the run completes, and every worker runs with 1 BLAS thread."""
    run = tmp_path / "run"
    args = cli_args(tiny_data, run, dist__workers=8, train__epochs=3, train__batch_size=32)
    with Launch(args, tmp_path / "launch.log") as la:
        la.wait_log("all 8 workers ready", 60)
        rid = la.run_id()
        envs = []
        for p in workers_of(rid):
            try:
                envs.append({k: p.environ().get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                             "MKL_NUM_THREADS")})
            except psutil.Error:  # finished already
                pass
        assert la.wait(90) == 0, la.log()
        if (psutil.cpu_count() or 1) < 16:
            assert "1 BLAS thread(s) each" in la.log()
            assert envs and all(set(e.values()) == {"1"} for e in envs), envs
        assert [m["step"] for m in step_records(run)] == list(range(15))
        assert wait_until(lambda: not workers_of(rid), 5) and not leftover_segments(rid)


@pytest.mark.timeout(60)
def test_timeline_chrome_trace(tiny_data, tmp_path):
    trace = tmp_path / "trace.json"
    cfg = tiny_cfg(tiny_data, tmp_path / "run", dist__workers=2, train__epochs=1, dist__timeline=str(trace))
    assert launch_inproc(cfg) == 0
    doc = json.loads(trace.read_text())
    events = doc["traceEvents"]
    assert events
    for e in events:
        assert e["ph"] == "X" and e["dur"] >= 0 and isinstance(e["ts"], (int, float)) and "tid" in e and "pid" in e
    names = {}
    for e in events:
        names.setdefault(e["tid"], set()).add(e["name"])
    for rank in range(2):
        assert {"wait", "load", "forward", "backward", "send"} <= names[f"rank {rank}"], names
    assert {"round", "reduce", "clip+update"} <= names["coordinator"], names
    steps = {e["args"]["step"] for e in events if e["tid"] == "coordinator" and e["name"] == "clip+update"}
    assert steps == set(range(len(step_records(tmp_path / "run"))))


@pytest.mark.timeout(90)
def test_tee_mirrors_one_ranks_log_to_the_console(tiny_data, tmp_path):
    """`launch --tee 1`: rank 1's log lines appear on the launcher's console, prefixed; rank 0's do not."""
    import subprocess
    import sys

    from distutil import cli_args
    args = cli_args(tiny_data, tmp_path / "run", dist__workers=2, train__epochs=1)
    r = subprocess.run([sys.executable, "-m", "dptrain", "launch", "--tee", "1", *args], capture_output=True,
                       text=True, timeout=80)
    assert r.returncode == 0, r.stderr
    teed = [ln for ln in r.stderr.splitlines() if ln.startswith("rank1 | ")]
    assert any("ready" in ln for ln in teed), r.stderr
    assert not any(ln.startswith("rank0 | ") for ln in r.stderr.splitlines())
    bad = subprocess.run([sys.executable, "-m", "dptrain", "launch", "--tee", "5", *args], capture_output=True,
                         text=True, timeout=80)
    assert bad.returncode == 1 and "--tee 5: no such rank (0..1)" in bad.stderr


def test_memory_warning_when_the_workers_would_not_fit(monkeypatch):
    """The estimate (measured: 744 MB for one default-model worker at 64 images) against available memory."""
    from types import SimpleNamespace

    from dptrain.config import Config
    from dptrain.distributed import session
    cfg = Config()
    cfg.train.batch_size = 64
    one = session.worker_memory_bytes(cfg, 9_434_462, 64)
    assert 650e6 < one < 850e6  # the bench measured 744 MB PSS
    monkeypatch.setattr(session.psutil, "virtual_memory", lambda: SimpleNamespace(available=int(1.5e9)))
    assert session.memory_warning(cfg, 9_434_462, 2) is None
    line = session.memory_warning(cfg, 9_434_462, 8)
    assert line and line.startswith("8 workers need about") and "1.5 GB available" in line


@pytest.mark.timeout(120)
def test_workers_run_nicer_only_when_they_outnumber_the_cores(tiny_data, tmp_path, monkeypatch):
    """More workers than physical cores: each runs OVERSUBSCRIBED_NICE nicer than the launcher (so handing out a step
    is not preempted by the workers already woken) and with the longest scheduler slice where the kernel has them
    (timeslice.py: each rank's log says so); otherwise at the launcher's own priority and the kernel's slice."""
    from dptrain.distributed import session, timeslice
    seen = []
    real = session.spawn_worker

    def spy(*args, **kwargs):
        proc = real(*args, **kwargs)
        seen.append(psutil.Process(proc.pid).nice())
        return proc
    monkeypatch.setattr(session, "spawn_worker", spy)
    monkeypatch.setattr(session, "physical_cores", lambda: 2)
    base = psutil.Process().nice()
    kw = dict(train__epochs=1, train__steps_per_epoch=2)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "three", dist__workers=3, **kw)) == 0
    assert seen == [min(base + session.OVERSUBSCRIBED_NICE, 19)] * 3
    line = "scheduler time slice 100 ms" if timeslice.supported() else "not available here"
    assert all(line in (tmp_path / "three" / "logs" / f"rank{r}.log").read_text() for r in range(3))
    seen.clear()
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "two", dist__workers=2, **kw)) == 0
    assert seen == [base] * 2
    assert "scheduler time slice" not in (tmp_path / "two" / "logs" / "rank0.log").read_text()
