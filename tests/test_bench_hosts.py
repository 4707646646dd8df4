"""`dptrain bench --hosts`: the pure helpers of dptrain/bench_hosts.py, and one short real run on a namespace cluster
(2 hosts + the head node, a small model, dptrain and, when torch imports, DDP) that checks the bytes per step on the
links against the model's size and that nothing is left behind."""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dptrain.bench import hosts as bh, netns_cluster as nc
from dptrain.bench.ddp import parse_master


# ---- helpers ------------------------------------------------------------------------------------------------------
def test_parse_hosts_list():
    assert bh.parse_hosts_list("2,3,4") == [2, 3, 4]
    assert bh.parse_hosts_list(" 3, 2,3,") == [2, 3]
    for bad in ("", "a", "0,2", "2;3", "65"):
        with pytest.raises(ValueError, match="--hosts"):
            bh.parse_hosts_list(bad)


def test_rate_bps():
    assert bh.rate_bps("1gbit") == 1e9
    assert bh.rate_bps("100mbit") == 1e8
    assert bh.rate_bps("2.5Gbit") == 2.5e9
    assert bh.rate_bps("10mbps") == 8e7
    assert bh.rate_bps("500") == 500
    assert bh.rate_bps("off") is None and bh.rate_bps("none") is None
    for bad in ("fast", "1gb", "-1mbit", "0mbit"):
        with pytest.raises(ValueError, match="--rate"):
            bh.rate_bps(bad)


def test_overrides_pass_through_unchanged():
    extra = ["--dist.plane=star", "--wire-dtype", "float16", "--bn=sync", "--dist.heartbeat-interval-s", "0.5",
             "--model.widths=[8,16]", "--train.lr=0.1"]
    out = bh.normalize_overrides(extra)
    assert out == ["--dist.plane=star", "--dist.wire_dtype=float16", "--dist.bn=sync",
                   "--dist.heartbeat_interval_s=0.5", "--model.widths=[8,16]", "--train.lr=0.1"]
    assert bh.override_dict(out)["dist.plane"] == "star"  # a key this bench does not know goes on to launch
    with pytest.raises(ValueError, match="unknown argument"):
        bh.normalize_overrides(["--bogus=1"])
    with pytest.raises(ValueError, match="needs a value"):
        bh.normalize_overrides(["--dist.plane"])


def test_records_and_per_step():
    recs, rest = bh.complete_records('{"step": 0, "step_s": 2.0}\n{"step": 1, "step_s": 1.0}\n{"step": 2, "st')
    assert [r["step"] for r in recs] == [0, 1] and rest == '{"step": 2, "st'
    recs += bh.complete_records(rest + 'ep_s": 3.0}\n{"epoch": 1, "step": 4, "train_loss": 1.0}\n')[0]
    recs.append({"step": 3, "step_s": 9.0})  # the untimed step after the timed ones
    assert bh.timed_step_s(recs, warmup=1, steps=2) == [1.0, 3.0]
    mb = bh.per_step_mb({"out": 100, "in": 1_000}, {"out": 6_000_100, "in": 3_001_000}, steps=3)
    assert mb == {"out": 2.0, "in": 1.0}


def test_zmq_io_thread_ticks():
    # a /proc/PID/task/TID/stat line: comm in parentheses (spaces and ')' allowed), utime and stime fields 14, 15
    line = "4242 (ZMQbg/IO/0) S 1 4242 4242 0 -1 4194368 50 0 0 0 731 52 0 0 20 0 3 0 100 0 0"
    assert nc.thread_ticks(line) == ("ZMQbg/IO/0", 731, 52)
    assert nc.thread_ticks("7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 5 6 0")[1:] == (5, 6)
    t = nc.CLK_TCK
    before = {(1, 2): (10, 5), (1, 3): (100, 0)}  # (1, 3) ends before the second sample: left out
    after = {(1, 2): (10 + 4 * t, 5 + t), (9, 9): (2 * t, 0)}  # (9, 9) starts meanwhile: counted from 0
    assert nc.io_cpu_s(before, after, steps=2) == {"user": 3.0, "sys": 0.5}
    # the coordinator (h1) and the agents (h2, h3) apart, user time only; kernel time apart
    w = bh.wire_cpu({1: {(1, 1): (0, 0)}, 2: {}, 3: {}},
                    {1: {(1, 1): (t, t)}, 2: {(2, 1): (2 * t, 0)}, 3: {(3, 1): (t, 0)}}, steps=1)
    assert w == {"wire_cpu_coord_s": 1.0, "wire_cpu_hosts_s": 3.0, "wire_cpu_s": 4.0, "wire_sys_s": 1.0}


def test_zmq_io_threads_of_this_namespace():
    # this process's own ZeroMQ I/O thread, found through its network namespace, and its CPU time grows while it
    # moves bytes (a PUSH/PULL pair over loopback, CURVE-encrypted: the work the bench attributes to the wire)
    import os
    import time

    import zmq
    others = set(nc.zmq_io_ticks([os.getpid()]))  # I/O threads of contexts earlier tests in this process left
    ctx = zmq.Context()
    try:
        server_pub, server_sec = zmq.curve_keypair()
        client_pub, client_sec = zmq.curve_keypair()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.curve_server, pull.curve_secretkey = True, server_sec
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.curve_serverkey, push.curve_publickey, push.curve_secretkey = server_pub, client_pub, client_sec
        push.connect(f"tcp://127.0.0.1:{port}")
        pids = nc.namespace_pids({"me": "/proc/self/ns/net"})["me"]
        assert os.getpid() in pids
        def mine():
            return {k: v for k, v in nc.zmq_io_ticks([os.getpid()]).items() if k not in others}
        # libzmq starts the I/O thread with the first socket and the thread names itself (ZMQbg/IO/0) once running:
        # on a loaded box that can come after connect returns
        deadline = time.monotonic() + 5
        while not mine() and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = mine()
        assert len(t0) == 1 and all(pid == os.getpid() for pid, _ in t0)  # one context, one I/O thread
        blob = b"\0" * (4 << 20)
        w0 = time.perf_counter()
        for _ in range(40):  # 168 MB sealed and opened, both by this context's one I/O thread
            push.send(blob)
            pull.recv(copy=False)
        wall = time.perf_counter() - w0
        cpu = nc.io_cpu_s(t0, mine(), steps=1)
        # at least the CURVE work: XSalsa20-Poly1305 at under 5 GB per CPU-second on any core this runs on, sealing
        # and opening each byte: >= 67 ms; less 1 tick for the sampling. At most the loop's wall time (one thread)
        # plus that tick.
        tick = 1 / nc.CLK_TCK
        assert 2 * 40 * len(blob) / 5e9 - tick <= cpu["user"] <= wall + tick, (cpu, wall)
    finally:
        ctx.destroy(linger=0)


def test_format_table_and_outputs(tmp_path):
    full = {"hosts": 2, "slots": 1, "workers": 2, "rate": "1gbit", "dptrain_step_s": 1.7368, "dptrain_images_per_s": 9.2,
            "dptrain_comm_s": 1.5561, "h1_out_mb": 75.7, "h1_in_mb": 75.7, "h2_out_mb": 37.8, "h2_in_mb": 0.0123,
            "ddp_step_s": 0.4907, "ddp_images_per_s": 32.6, "ddp_comm_s": 0.1387, "ddp_h2_out_mb": 37.8,
            "ddp_h2_in_mb": 37.8, "dptrain_vs_ddp": 0.28, "wire_cpu_s": 0.1234, "plane": "star", "wire_dtype": "float32", "batch_size": 16,
            "warmup": 2, "steps": 6, "threads": 1}
    failed = {"hosts": 3, "slots": 1, "workers": 3, "rate": "1gbit", "error": "dptrain launch on 3 hosts: exit 1"}
    text = bh.format_table([full, failed])
    row2, row3 = text.splitlines()[3:5]
    assert "0.123|" in row2 and "crypto s" in text.splitlines()[1]
    assert "1736.8" in row2 and "75.7" in row2 and "0.0123" in row2 and "490.7" in row2 and "0.28" in row2
    assert row3.split()[:4] == ["3", "3", "1gbit", "|"] and "error: dptrain launch on 3 hosts" in row3
    assert "plane star, wire float32; global batch 16, 2 warm-up + 6 timed steps, 1 thread(s)" in text
    bh.write_outputs([full, failed], tmp_path)
    with open(tmp_path / "bench-hosts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["hosts"] for r in rows] == ["2", "3"] and rows[0]["h1_out_mb"] == "75.7" and rows[1]["error"]
    assert json.loads((tmp_path / "bench-hosts.json").read_text())[0] == full


def test_parse_master():
    assert parse_master("10.213.0.12:29500") == ("10.213.0.12", 29500)
    for bad in ("10.0.0.1", "10.0.0.1:", ":29500", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="ADDR:PORT"):
            parse_master(bad)


def test_bench_flags():
    from dptrain.cli import build_parser
    args, extra = build_parser().parse_known_args(["bench", "--hosts", "2,3", "--dist.plane=star"])
    assert (args.hosts, args.rate, args.slots, args.batch_size, args.steps) == ("2,3", "1gbit", 1, None, None)
    assert extra == ["--dist.plane=star"]


# ---- one real run -------------------------------------------------------------------------------------------------
SMALL = ["--batch-size", "16", "--image-size", "16", "--classes", "10", "--model.widths=[8]", "--model.res_width=0",
         "--model.hidden=2048"]  # ~1.07 M parameters: 4.3 MB of gradients per host and step, steps of ~0.1 s


def _grad_mb() -> float:
    from dptrain.config import ModelConfig
    from dptrain.nn.model import build_model
    from dptrain.nn.params import ParamStore
    store = ParamStore(np.float32)
    build_model(ModelConfig(widths=[8], res_width=0, hidden=2048), 10, 16, store, rng=np.random.default_rng(0))
    return store.num_params * 4 / 1e6


def _ip_netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout


@pytest.mark.timeout(120)
def test_two_hosts_dptrain_and_ddp(tmp_path):
    from netns import require_netns
    require_netns()
    # the counters this bench reads (the root-side veth) are those of eth0 inside the host, in and out swapped
    with nc.Cluster(2, 1) as c:
        subprocess.run(["ip", "netns", "exec", c.ns(1), "bash", "-c", f"exec 3<>/dev/tcp/{c.addr(2)}/22; head -c 4 <&3"],
                       capture_output=True, timeout=10)
        before = c.link_bytes(2)
        inside = subprocess.run(["ip", "netns", "exec", c.ns(2), "cat", "/sys/class/net/eth0/statistics/tx_bytes",
                                 "/sys/class/net/eth0/statistics/rx_bytes"], capture_output=True, text=True,
                                timeout=10).stdout.split()
        after = c.link_bytes(2)
        assert before["out"] <= int(inside[0]) <= after["out"] and before["in"] <= int(inside[1]) <= after["in"]
        assert before["out"] > 0 and before["in"] > 0
    assert c.ns(1) not in _ip_netns_list()

    ddp = importlib.util.find_spec("torch") is not None
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dptrain", "bench", "--hosts", "2", "--rate", "1gbit", "--json",
                           "--warmup", "1", "--steps", "3", "--images", "200", "--data-dir", str(tmp_path / "data"),
                           "--out", str(out), "--no-progress", *SMALL, "--dist.plane", "star",
                           *([] if ddp else ["--no-ddp"])],
                          capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert (row["hosts"], row["workers"], row["threads"]) == (2, 2, 1) and "error" not in row
    assert (row["plane"], row["wire_dtype"], row["overrides"].split()[-1]) == ("star", "float32", "--dist.plane=star")
    assert row["dptrain_step_s"] > 0 and row["dptrain_comm_s"] >= 0
    g = _grad_mb()
    # per timed step (star plane): each agent sends its gradient and receives the weights; the head node does both for
    # 2 hosts. Start-up (welcome, initial weights, preflight) and shutdown would add at least one g: not counted.
    for key, n in (("h2_out_mb", 1), ("h2_in_mb", 1), ("h1_out_mb", 2), ("h1_in_mb", 2)):
        assert 0.8 * n * g < row[key] < 1.5 * n * g, (key, row[key], g)
    # the wire's cryptography: the star's coordinator seals and opens all its link carries (~17 MB a step here, 52
    # MB over the 3 timed steps: >= 10 ms even at 5 GB per CPU-second, well above CURVE's speed on any core, so at
    # least one 1/CLK_TCK tick), each agent what its own does. The I/O threads cannot use more CPU than the box has
    # during the steps: a sample's delta is within 1 tick of the truth per thread (about 10 I/O threads: the
    # coordinator's, 2 agents', their workers'), spread over the 3 timed steps.
    import os
    slack = 10 / nc.CLK_TCK / 3
    assert 0 < row["wire_cpu_coord_s"] and 0 <= row["wire_cpu_hosts_s"] and row["wire_sys_s"] >= 0, row
    assert row["wire_cpu_s"] <= (os.cpu_count() or 1) * row["dptrain_step_s"] + slack, row
    assert row["wire_cpu_s"] == pytest.approx(row["wire_cpu_coord_s"] + row["wire_cpu_hosts_s"])
    if ddp:
        assert row["ddp_step_s"] > 0 and row["dptrain_vs_ddp"] > 0 and "ddp_comm_s" in row
        assert 0.8 * g < row["ddp_h2_out_mb"] < 2.5 * g and 0.8 * g < row["ddp_h2_in_mb"] < 2.5 * g
    assert json.loads((out / "bench-hosts.json").read_text())[0]["hosts"] == 2
    assert (out / "bench-hosts.csv").read_text().startswith("hosts,")
    prefix = re.search(r"cluster (dpb[a-z0-9]+) up", proc.stderr).group(1)
    assert prefix not in _ip_netns_list()  # torn down: namespaces, and with them every process in them
    assert not (nc.STATE_BASE / prefix).exists()


@pytest.mark.timeout(120)
def test_ddp_ring_cpu():
    """`python -m dptrain.bench.ddp --ring-cpu W`: gloo's ring alone, the plan's gloo_bytes_per_cpu_s. Bounds: a
    rank sends 2(W-1)/W of the tensor exactly; per CPU-second it cannot move more than memory bandwidth allows (it
    copies and sums every byte at least once: < 100 GB/s on any box this runs on) nor less than 10 MB (a ring
    that slow would be broken, not slow)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch not installed (the oracle extra)")
    bad = subprocess.run([sys.executable, "-m", "dptrain.bench.ddp", "--ring-cpu", "1"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--ring-cpu wants at least 2 ranks" in bad.stderr
    import os
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.bench.ddp", "--ring-cpu", "2", "--params", "2000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=100)
    finally:  # the ranks are the child's children, in its session: reap them all
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r["world"] == 2 and r["bytes_sent_per_rank"] == 2 * 1 / 2 * 4 * 2_000_000
    assert 1e7 < r["gloo_bytes_per_cpu_s"] < 1e11 and r["cpu_s_per_rank"] > 0
