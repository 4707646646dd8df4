"""Workers' scheduler time slices (distributed/timeslice.py): asked for, read back, inherited, kept apart from nice."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dptrain.config import Config
from dptrain.distributed import session, timeslice

PROBE = """
import json, os, threading
from dptrain.distributed import timeslice as t
before = []
go = threading.Event()
early = threading.Thread(target=lambda: (go.wait(), before.append(t.get_slice_ns())))
early.start()
default = t.get_slice_ns()
start = os.nice(0)  # the caller's niceness (make, nice -n 10 ...)
os.nice(3)
ok = t.set_slice(20)
after = []
late = threading.Thread(target=lambda: after.append(t.get_slice_ns()))
late.start(); late.join(); go.set(); early.join()
clamped = t.set_slice(500)
print(json.dumps({"ok": ok, "main": t.get_slice_ns() if not clamped else None, "late": after[0], "early": before[0], "default": default,
                  "nice": os.nice(0), "start": start, "clamped": clamped, "after_clamp": t.get_slice_ns()}))
"""


@pytest.mark.timeout(60)
def test_a_slice_is_kept_inherited_by_new_threads_and_leaves_nice_alone():
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                    timeout=50).stdout)
    if not timeslice.supported():
        assert out["ok"] is False and out["clamped"] is False
        return
    assert out["ok"] is True
    assert out["late"] == 20_000_000  # a thread started afterwards inherits the slice
    assert out["default"] < 20_000_000  # the kernel's own (a few ms)
    assert out["early"] == out["default"]  # a thread started before keeps it: workers ask before their first thread
    assert out["nice"] == min(out["start"] + 3, 19)  # the niceness set before is kept, whatever it started at
    assert out["clamped"] is True and out["after_clamp"] == timeslice.MAX_MS * 1_000_000


def test_the_launcher_asks_for_long_slices_only_when_workers_outnumber_the_cores(monkeypatch):
    monkeypatch.setattr(session, "physical_cores", lambda: 2)
    cfg = Config()
    assert [session.worker_slice_ms(cfg, n) for n in (1, 2, 3, 8)] == [0, 0, timeslice.MAX_MS, timeslice.MAX_MS]
    cfg.dist.bn = "sync"  # its barriers want prompt hand-overs
    assert session.worker_slice_ms(cfg, 8) == 0
    cfg.dist.bn, cfg.dist.timeslice_ms = "stats", 0
    assert session.worker_slice_ms(cfg, 8) == 0
    cfg.dist.timeslice_ms = 30
    assert session.worker_slice_ms(cfg, 1) == 30
    assert session.worker_env(1, 30)[timeslice.ENV] == "30"


def test_the_workers_reading_of_the_launchers_choice(monkeypatch):
    monkeypatch.setenv(timeslice.ENV, "0")
    assert timeslice.apply_from_env() == ""
    monkeypatch.setenv(timeslice.ENV, "fast")
    assert "not a number" in timeslice.apply_from_env()
