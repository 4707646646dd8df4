"""One-host runs on a shared machine: another user cannot reach the run's socket, and a process of the same user that
the launcher did not start cannot join, read the weights or steer the training.

The coordinator of `dptrain launch --workers N` listens on ipc:// inside /tmp/dptrain-UID/RUN (0700, checked to be
ours): the file system keeps other users out. Its workers get a per-run token on their stdin (never the command
line), and a HELLO without it is refused: that is what tells a worker of this run from another process of the same
user. Real processes; a second unix user made by the test (root only, as in CI).
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from distutil import Launch, cli_args, flood, params, wait_until, workers_of

from dptrain.distributed import protocol as P
from dptrain.distributed.versions import local_versions

OTHER = "dptrain-other"
SYSTEM_PYTHON = "/usr/bin/python3"


def start(tiny_data, out: Path, **kw) -> Launch:
    args = cli_args(tiny_data, out, **{"dist__workers": 2, "dist__bn": "sync", "train__epochs": 3, **kw})
    return Launch(args, out.parent / f"{out.name}.log")


def other_user() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user")
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("useradd") is None:
        pytest.skip("needs useradd and a system python3 another user can run")
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER], check=True)
    return OTHER


PROBE = r"""
import json, os, socket, sys
path = sys.argv[1]
out = {}
try:
    os.listdir(os.path.dirname(path)); out["list"] = "ok"
except OSError as e:
    out["list"] = type(e).__name__
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path); out["connect"] = "ok"
except OSError as e:
    out["connect"] = type(e).__name__
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_another_user_cannot_reach_the_socket_and_no_secret_is_on_a_command_line(tiny_data, tmp_path):
    user = other_user()
    with start(tiny_data, tmp_path / "run", train__epochs=200) as la:
        endpoint = la.endpoint()
        assert endpoint.startswith("ipc://")
        path = endpoint.removeprefix("ipc://")
        run_dir = Path(path).parent
        assert (run_dir.stat().st_mode & 0o777) == 0o700 and (run_dir.parent.stat().st_mode & 0o777) == 0o700
        assert wait_until(lambda: len(workers_of(la.run_id())) == 2, 30), la.log()
        probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, path], user=user, capture_output=True, text=True,
                               timeout=30, cwd="/")
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout) == {"list": "PermissionError", "connect": "PermissionError"}
        for proc in workers_of(la.run_id()):  # what `ps` shows everyone: no token, nothing that grants access
            cmd = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
            env = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
            assert "token" not in cmd and endpoint in cmd.replace("\0", " ")
            assert not re.search(r"[0-9a-f]{32}", cmd + env)  # the token's shape
        la.proc.send_signal(signal.SIGTERM)
        assert la.wait(30) == 130, la.log()
    assert not run_dir.exists()  # the run's private directory goes with it


def _impostor(endpoint: str, run_id: str, stop: threading.Event, got: list, sent: list) -> None:
    """Same user, not started by the launcher: HELLO for every rank (before and after the real workers), and
    RESULTs and sync-BN sums for every step, until stopped."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    grad = np.full(64, 1e3, np.float32)
    msgs = []
    for rank in (0, 1, 2):
        msgs.append(P.encode(P.Kind.HELLO, run_id, rank=rank, role="worker", host="impostor", pid=1, slots=1,
                             **local_versions()))
        msgs.append(P.encode(P.Kind.HELLO, run_id, rank=rank, role="worker", host="impostor", pid=1, slots=1,
                             token="0" * 32, **local_versions()))
        for step in range(15):
            msgs.append(P.encode(P.Kind.RESULT, run_id, step=step, rank=rank, arrays={"grad": grad}, phase="train",
                                 attempt=0, count=16, loss_sum=0.0, correct=16, grad_in="frame", grad_scale=1.0,
                                 timings={}))
            msgs.append(P.encode(P.Kind.BN_REDUCE, run_id, step=step, rank=rank, layer=0, phase="fwd", attempt=0,
                                 arrays={"moments": np.ones((3, 8))}))
    replies: list = []
    flood([sock], msgs, stop, sent, replies)
    got.extend(P.decode(r, run=None).kind for r in replies)
    ctx.term()


@pytest.mark.numerics
@pytest.mark.timeout(120)
def test_a_process_without_the_token_is_refused_and_changes_nothing(tiny_data, tmp_path):
    with start(tiny_data, tmp_path / "clean", train__steps_per_epoch=5) as la:
        assert la.wait(60) == 0, la.log()
    stop, got, sent = threading.Event(), [], [0]
    with start(tiny_data, tmp_path / "attacked", train__steps_per_epoch=5) as la:
        endpoint, run_id = la.endpoint(), la.run_id()  # printed before the workers start: the race is on
        t = threading.Thread(target=_impostor, args=(endpoint, run_id, stop, got, sent))
        t.start()
        try:
            assert la.wait(60) == 0, la.log()
        finally:
            stop.set()
            t.join(10)
        log = la.log()
    assert sent[0] > 50
    assert got == []  # dropped unanswered: never a STOP, a WELCOME, weights or a BN sum
    assert "not started by this run's launcher" in log and "impostor" not in log
    assert np.array_equal(params(tmp_path / "attacked"), params(tmp_path / "clean"))
