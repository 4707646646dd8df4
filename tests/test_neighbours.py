"""Neighbours on a shared machine: a one-host run on a TCP port (`launch --port`, no CURVE) against another local
user who reads the port and the run id from `ps`.

The intruder is a real process (a second system account made here when the tests run as root, as in CI; the same
user otherwise) with plain DEALER sockets: it finds the workers in /proc as `ps` does, takes ZeroMQ identities
shaped like theirs (name and pid; before they connect, when it is quick enough), and sends HELLO, HEARTBEAT and ERROR for every rank with the
right run id, guessed and empty tokens, and a 100 MB frame. Compared against the same run without it: the same
weights bit for bit (the token gate drops every message it sends, so nothing it does reaches the training), nothing
sent back to it, and a bounded number of short refusal lines in the log.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from distutil import ROOT, Launch, cli_args, params

OTHER = "dptrain-other"

INTRUDER = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import zmq
from dptrain.distributed import protocol as P
from dptrain.distributed.versions import local_versions

deadline = time.monotonic() + float(sys.argv[2])
port = sys.argv[3]  # which run to pick among the machine's (other runs may be going on)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
found = {}  # worker pid -> (endpoint, run id, rank), read as `ps` does
while time.monotonic() < deadline and len(found) < 2 and not stop:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        except OSError:
            continue
        if "worker" in cmd and "--connect" in cmd and cmd[cmd.index("--connect") + 1].endswith(":" + port):
            found[int(pid)] = (cmd[cmd.index("--connect") + 1], cmd[cmd.index("--run") + 1],
                               int(cmd[cmd.index("--rank") + 1]))
    time.sleep(0.01)
if not found:
    print(json.dumps({"found": 0})); sys.exit(0)
endpoint, run = next(iter(found.values()))[:2]
ctx = zmq.Context()
socks = []
for pid, (_, _, rank) in found.items():  # the identities the workers had before they were made random
    for name in (f"rank{rank}-{pid}", f"hb{rank}-{pid}"):
        s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.setsockopt(zmq.IDENTITY, name.encode())
        s.connect(endpoint); socks.append(s)
plain = ctx.socket(zmq.DEALER); plain.setsockopt(zmq.LINGER, 0); plain.connect(endpoint); socks.append(plain)
msgs = []
for rank in (0, 1):
    for token in ({}, {"token": "0" * 32}, {"token": ""}):
        msgs.append(P.encode(P.Kind.HELLO, run, rank=rank, role="worker", host="intruder", pid=1, slots=1,
                             **local_versions(), **token))
        msgs.append(P.encode(P.Kind.HEARTBEAT, run, rank=rank, **token))
        msgs.append(P.encode(P.Kind.ERROR, run, rank=rank, message="intruder says rank failed", traceback="x" * 1000,
                             **token))
big = [P.encode(P.Kind.HEARTBEAT, run, rank=0)[0], b"\0" * (100 << 20)]
sent = got = bigs = 0
while time.monotonic() < deadline and not stop:
    for s in socks:
        for m in msgs:
            try:
                s.send_multipart(m, flags=zmq.NOBLOCK); sent += 1
            except zmq.Again:
                pass
        while s.poll(5):
            s.recv_multipart(); got += 1
    if bigs < 3:  # a few: each costs the sender 100 MB, and the coordinator drops the connection at its length
        try:
            plain.send_multipart(big, flags=zmq.NOBLOCK); bigs += 1
        except zmq.Again:
            pass
for s in socks:
    s.close(0)
ctx.term()
print(json.dumps({"found": len(found), "sent": sent, "got": got, "bigs": bigs}))
"""


def intruder_user() -> list[str]:
    """How to run a command as the other account: setpriv as a second system user when root, else nothing."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        return []
    try:
        pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER], check=True)
    as_other = ["setpriv", "--reuid", OTHER, "--regid", OTHER, "--clear-groups"]
    # the other account must be able to run this interpreter with pyzmq and this checkout: a checkout in a folder
    # only its owner may enter (a mktemp folder, /root) is not readable to it; then the intruder runs as this user
    # (a process without the run's token all the same, which is what the gate checks)
    probe = subprocess.run([*as_other, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            "import zmq, dptrain.distributed.protocol"], capture_output=True, cwd="/", timeout=60)
    return as_other if probe.returncode == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tiny_data, out, port: int) -> list[str]:
    return cli_args(tiny_data, out, dist__workers=2, dist__bn="sync", dist__port=port, train__epochs=1,
                    train__steps_per_epoch=8)


@pytest.mark.timeout(240)
def test_a_neighbour_on_the_tcp_port_cannot_end_or_change_the_run(tiny_data, tmp_path):
    with Launch(_args(tiny_data, tmp_path / "clean", _free_port()), tmp_path / "clean.log") as la:
        assert la.wait(90) == 0, la.log()
    port = _free_port()
    intruder = subprocess.Popen([*intruder_user(), sys.executable, "-c", INTRUDER, str(ROOT), "150", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                                start_new_session=True)
    try:
        with Launch(_args(tiny_data, tmp_path / "attacked", port), tmp_path / "attacked.log") as la:
            assert la.endpoint() == f"tcp://127.0.0.1:{port}"
            rc = la.wait(120)
            log = la.log()
        assert rc == 0, log
        intruder.terminate()  # it stops and says what it saw
        out, err = intruder.communicate(timeout=60)
    finally:
        if intruder.poll() is None:
            os.killpg(intruder.pid, 9)
            intruder.wait()
    assert intruder.returncode == 0, err
    seen = json.loads(out)
    assert seen["found"] == 2 and seen["sent"] > 100 and seen["bigs"] >= 1, seen  # it saw the run and attacked
    assert seen["got"] == 0, seen  # no HEARTBEAT, no STOP, nothing: it learns nothing from the coordinator
    assert np.array_equal(params(tmp_path / "attacked"), params(tmp_path / "clean"))
    refusals = [ln for ln in log.splitlines() if "not started by this run's launcher" in ln
                or "dropped a message" in ln or "more dropped messages" in ln]
    assert refusals and "intruder" not in log, log[-3000:]
    # at most DROP_LOG_BURST + 1 lines per DROP_LOG_WINDOW_S of the run, each cut at DROP_LINE_CHARS (+ the prefix)
    from dptrain.distributed.protocol import DROP_LINE_CHARS, DROP_LOG_BURST
    assert len(refusals) <= (120 // 10 + 1) * (DROP_LOG_BURST + 1), len(refusals)
    assert max(len(ln) for ln in refusals) < DROP_LINE_CHARS + 80, max(refusals, key=len)
    assert not any("is dead" in ln or "reported an error" in ln for ln in log.splitlines()), log[-3000:]


def test_every_socket_has_the_runs_frame_limit_and_a_larger_frame_never_arrives(tiny_data, tmp_path):
    """protocol.max_frame_bytes against the frames a run of the tiny model really sends (its largest: the exact
    int64 gradient of --batch-invariant over sockets, 8 bytes a parameter), then libzmq's ZMQ_MAXMSGSIZE on the
    coordinator's real socket: a frame of exactly the limit arrives, one byte more drops the sender's connection
    unread (the sender's next, small message arrives over its new connection)."""
    import time

    import zmq
    from distutil import tiny_cfg

    from dptrain.data.dataset import load_dataset
    from dptrain.distributed import protocol as P
    from dptrain.distributed.coordinator import Coordinator
    from dptrain.distributed.mesh import MeshLink
    from dptrain.distributed.peer import PeerLink
    from dptrain.distributed.session import frame_limit
    from dptrain.nn.model import build_model
    from dptrain.nn.params import ParamStore
    cfg = tiny_cfg(tiny_data, tmp_path / "run", dist__port=0, train__batch_invariant_block=8, dist__bn="sync",
                   model__hidden=192)  # 200 k parameters: the gradient, not the header bound, is the largest
    ds = load_dataset(cfg.data, cfg.train.seed, progress=False)
    store = ParamStore(np.float32)
    model = build_model(cfg.model, len(ds.class_names), cfg.data.image_size, store)
    limit = frame_limit(cfg, model, len(ds.labels))
    frames = [P.encode(P.Kind.RESULT, "r", arrays={"grad": np.zeros(store.num_params, np.int64),
                                                   "bn_moments": np.zeros(model.bn_moments_size * 4)},
                       phase="train", attempt=0, count=1, loss_sum=0.0, correct=0, grad_in="frame", grad_scale=1.0,
                       timings={}),
              P.encode(P.Kind.STEP, "r", arrays={"indices": np.arange(cfg.train.batch_size),
                                                 "params": np.zeros(store.num_params, np.float32),
                                                 "buffers": np.zeros(store.num_buffers, np.float32)},
                       phase="train", epoch=0, attempt=0, weights_version=1, weights_slot=-1, global_count=1,
                       eval_batch=0, shard_sizes=[1]),
              P.encode(P.Kind.WELCOME, "r", arrays={"labels": ds.labels}, world_size=1, rank_base=0, config={},
                       shm={}, num_classes=8)]
    sizes = [len(memoryview(f).cast("B")) for m in frames for f in m]
    assert max(sizes) == limit == 8 * store.num_params > P.DEFAULT_LIMITS.max_header_bytes

    coord = Coordinator(cfg, "r", 1, {}, {}, token="t" * 32, max_frame=limit)
    ctx = zmq.Context()
    try:
        assert coord.sock.getsockopt(zmq.MAXMSGSIZE) == limit
        link = PeerLink(coord.endpoint, "r", 0, "rank 0", max_frame=limit)
        assert link.sock.getsockopt(zmq.MAXMSGSIZE) == limit
        link.close()
        mesh = MeshLink(ctx, "127.0.0.1", None, "r", 0, "h", limit)
        assert mesh.sock.getsockopt(zmq.MAXMSGSIZE) == limit
        mesh.close()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(coord.endpoint)

        def arrives(*parts) -> list | None:
            d.send_multipart(list(parts))
            if not coord.sock.poll(2000):
                return None
            return [len(f) for f in coord.sock.recv_multipart()[1:]]
        assert arrives(b"h", bytes(limit)) == [1, limit]
        assert arrives(b"h", bytes(limit + 1)) is None
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:  # ZeroMQ reconnects the dropped DEALER on its own
            got = arrives(b"small")
        assert got == [5]
        d.close(0)
    finally:
        coord.close()
        ctx.term()
