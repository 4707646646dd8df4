"""The mesh data plane across hosts (dist.plane = "mesh"): network namespaces with real sshd, real agents.

The multi-host suite (test_multihost.py) already runs on the mesh, the default: equivalence with one host, no-ssh
agents, intruders at the coordinator, a host killed under both policies. Here: the mesh's own promises.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from distutil import ROOT, TINY, fault_env, flood
from gradcheck import rel_error
from multihost_util import (
    agent,
    dptrain_pids,
    launcher,
    make_data,
    params,
    step_records,
    summary,
    train_args,
    wait_until,
)
from netns import cluster, require_netns

from dptrain.distributed import protocol as P


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    require_netns()
    return make_data(tmp_path_factory.mktemp("meshdata"))


def run_hosts(c, data, out, *extra, **train):
    return launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind", c.coordinator_addr,
                    *extra, *train_args(data, out, **train)], out.parent / f"{out.name}.log")


# ---- the same bits as the star -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.numerics
def test_mesh_equals_star_bitwise_and_float16_replicas_stay_identical(data, tmp_path):
    """float32: the owners sum in host order, exactly what the coordinator does on the star. Both: every host's
    weights are checked against the synced state after every step (a mismatch aborts the run). With the factored
    hidden Linear (the default) its weight gradient is one GEMM over the whole batch instead of a sum over hosts:
    the same mathematics, other float32 groupings (close to the star, not bitwise)."""
    got = {}
    with cluster(3, slots=2) as c:  # 2 workers a host: their sum is built piece by piece as backward goes
        for name, extra in (("star", ["--plane", "star"]), ("mesh-curve", ["--plane", "mesh", "--dist.factored=false", "--dist.bulk_cipher=curve"]),
                            ("factored", ["--plane", "mesh", "--dist.factor_update=owners"]),
                            ("replicated", ["--plane", "mesh"]),
                            ("mesh", ["--plane", "mesh", "--dist.factored=false"]),  # the default cipher: AES-GCM
                            ("mesh16", ["--plane", "mesh", "--wire-dtype", "float16", "--dist.factor_update=owners"]),
                            ("mesh16-rep", ["--plane", "mesh", "--wire-dtype", "float16"])):
            out = tmp_path / name
            # He init: the float16 bound below was set with it (PyTorch's, the default, drifts to ~3e-2 in 10 steps)
            with run_hosts(c, data, out, *extra, "--dist.sync_every=1", "--model.init=he", train__steps_per_epoch=5,
                           train__epochs=2) as la:
                assert la.wait(60) == 0, la.log()
            got[name] = params(out)
            if name.startswith("mesh"):
                assert "mesh data plane 1 over 3 hosts (h1, h2, h3)" in la.log()
                # dist.factor_update = auto at this small batch: every host updates the factored Linear itself
                assert ("updates the factored Linear" in la.log()) == (name in ("replicated", "mesh16-rep"))
                sealed = "bulk frames sealed with AES-256-GCM" in (out / "logs" / "host-h2.log").read_text()
                assert sealed == (name != "mesh-curve")
                s = summary(out)
                assert s["plane"] == "mesh" and s["breakdown"]["update_by"] == "hosts"
                assert s["replica_checks"] == 10  # every step: each host's weights equal the synced state
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)
    assert np.array_equal(got["mesh"], got["star"])
    assert np.array_equal(got["mesh-curve"], got["star"])  # sealed and opened either way: the same bytes arrive
    assert 0 < rel_error(got["factored"], got["star"]) < 1e-5
    # replicated: every host runs each owner's GEMM on the same inputs (replica_checks above: every host's weights
    # equal the synced ones after every step); its slices are even in the other parameters (mesh_layout.plane_slices), so
    # the owners' GEMMs have other shapes than with factor_update = owners: the same mathematics, other float32
    # groupings (OpenBLAS's Haswell kernels round by blocking: bitwise equal on the AVX-512 ones here), within the
    # bound of factored against star above (the same dW from other float32 groupings, 10 steps)
    assert rel_error(got["replicated"], got["factored"]) < 1e-5
    # with the float16 wire the replicated layer is not rounded (it never travels): the other weights are, as before
    assert 0 < rel_error(got["mesh16-rep"], got["factored"]) < 1e-2
    assert 0 < rel_error(got["mesh16"], got["factored"]) < 1e-2  # rounded on the wire, close to float32


# ---- the all-gather beside the next forward -----------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.numerics
@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_the_next_step_starts_while_the_all_gather_arrives_with_the_same_bits(data, tmp_path, wire):
    """dist.gather_overlap (the default): a host's workers start a step while the last step's all-gather still
    arrives, each layer's forward waiting for its own weights (the timeline shows those waits). The bits are those
    of the agent taking the whole all-gather first; SYNCs every 5 steps (a SYNC takes the whole all-gather first)
    find every replica equal."""
    got = {}
    with cluster(3, slots=2) as c:
        for name, extra in (("overlap", []), ("whole", ["--dist.gather_overlap=false"])):
            out = tmp_path / name
            trace = tmp_path / f"{name}-timeline.json"
            with run_hosts(c, data, out, "--plane", "mesh", "--wire-dtype", wire, "--dist.sync_every=5",
                           f"--dist.timeline={trace}", "--dist.factor_update=owners", *extra,
                           train__steps_per_epoch=5, train__epochs=2) as la:
                assert la.wait(90) == 0, la.log()
            got[name] = params(out)
            assert summary(out)["replica_checks"] >= 2
            events = json.loads(trace.read_text())
            events = events["traceEvents"] if isinstance(events, dict) else events
            waits = [e for e in events if e.get("name") == "weights_wait"]
            # one a host (its busiest worker's timings) each step that an all-gather preceded and no SYNC (which
            # takes the whole all-gather first) came between: 8 of the 10 steps here
            assert len(waits) == (3 * 8 if name == "overlap" else 0), (name, len(waits))
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)
    assert np.array_equal(got["overlap"], got["whole"])


# ---- a replica that drifts ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault,message", [("wdrift", "the weights of"),
                                           ("vdrift", "the momentum of the replicated layer on")])
def test_a_replica_that_drifts_is_caught_at_the_next_sync(data, tmp_path, fault, message):
    """SYNC's checksums: a host whose copy of the weights, or (every host updating the factored Linear itself) of
    that layer's momentum, silently changed after its update of step 3 stops the run at the next SYNC, named. With
    sync_every 1 a SYNC is asked for at every step whose predecessor's has come back: the one that sees it covers
    step 3 or, if step 2's was still on its way then, step 4 (by which the momentum's drift is in the weights too)."""
    with cluster(3) as c:
        out = tmp_path / "run"
        args = ["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind", c.coordinator_addr,
                "-x", "DPTRAIN_FAULT", "-x", "PYTHONPATH", "--dist.sync_every=1",
                *train_args(data, out, train__steps_per_epoch=5, train__epochs=2)]
        with launcher(args, tmp_path / "launch.log", fault_env(f"{fault}:3:1")) as la:
            rc = la.wait(60)
            log = la.log()
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)
    assert "every host updates the factored Linear" in log
    line = next((ln for ln in log.splitlines() if message in ln), None)
    assert rc != 0 and line is not None and "h2" in line, log
    assert int(re.search(r"step (\d+): ", line).group(1)) in (3, 4), line


# ---- a lost host in the middle of the chain of slices ------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cipher", ["curve", "aes-gcm"])  # aes-gcm: plane 2 brings new keys, counters from 0
def test_lost_middle_host_under_continue_reforms_the_plane_over_the_survivors(data, tmp_path, cipher):
    epochs, steps = 30, 150  # 5 steps an epoch
    with cluster(3, slots=1) as c:
        out = tmp_path / "run"
        with run_hosts(c, data, out, "--on-worker-failure", "continue", "--dist.sync_every=7",
                       f"--dist.bulk_cipher={cipher}", train__epochs=epochs) as la:
            la.wait_log("all 3 hosts ready")
            assert wait_until(lambda: len(step_records(out)) >= 3, 30), la.log()
            c.kill_host("h2")
            assert la.wait(90) == 0, la.log()
            log = la.log()
        # noticed in a training step or at the epoch's sync before evaluating
        assert re.search(r"lost rank 1 \(host h2\b.*; redoing the step.* on 2 surviving rank", log), log
        assert "mesh data plane 2 over 2 hosts (h1, h3)" in log
        s = summary(out)
        assert s["steps"] == steps and s["replica_checks"] >= epochs  # a sync (and check) at least every epoch end
        assert [r["step"] for r in step_records(out)] == list(range(steps))
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


# ---- capacity coming back: a lost host's agent started again over ssh joins the running job -----------------------
def _agent_pid(c, host: str) -> int | None:
    for pid in c.pids(host):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"agent" in cmd and b"dptrain" in cmd:
            return pid
    return None


@pytest.mark.timeout(150)
def test_lost_agent_is_started_again_and_rejoins_the_mesh(data, tmp_path):
    """--max-worker-restarts 1: h2's agent is killed mid-run; the launcher starts it again over ssh with --join, the
    coordinator waits for it at the next step boundary, settles the hosts' state and forms the plane over all 3
    hosts again; every step is done once, and the replicas stay checked."""
    epochs, steps = 12, 60
    with cluster(3, slots=1) as c:
        out = tmp_path / "run"
        with run_hosts(c, data, out, "--on-worker-failure", "continue", "--max-worker-restarts", "1",
                       "--dist.sync_every=7", train__epochs=epochs) as la:
            la.wait_log("all 3 hosts ready")
            assert wait_until(lambda: len(step_records(out)) >= 3, 30), la.log()
            first = _agent_pid(c, "h2")
            os.kill(first, signal.SIGKILL)
            assert la.wait(120) == 0, la.log()
            log = la.log()
        assert re.search(rf"rank 1 \(host h2, pid {first}\) is dead", log), log
        assert re.search(r"starting a replacement for rank 1 on h2 \(pid \d+; restart 1 of 1\)", log), log
        assert re.search(r"rank 1 \(host h2, pid \d+\) is back after", log), log
        planes = re.findall(r"mesh data plane \d+ over (\d) hosts", log)
        assert planes[0] == "3" and planes[-1] == "3" and "2" in planes, planes  # lost, then whole again
        s = summary(out)
        assert s["steps"] == steps and s["replica_checks"] >= epochs
        assert [r["step"] for r in step_records(out)] == list(range(steps))
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(150)
def test_agent_started_later_with_join_takes_the_place_of_a_lost_host(data, tmp_path):
    """No-ssh mode (agents started by hand, as Slurm would): h2's agent is killed, the run goes on over h1; then
    `dptrain agent --join` (no host index) on h2 takes the lost place, and the plane is formed over both again."""
    out, run_id, port = tmp_path / "run", f"join{os.getpid()}", 29900 + os.getpid() % 90
    with cluster(2, slots=1) as c:
        endpoint = f"tcp://{c.coordinator_addr}:{port}"
        args = ["-H", ",".join(f"{h}:1" for h in c.hosts), "--no-ssh", "--bind", c.coordinator_addr, "--port",
                str(port), "--run-id", run_id, "--on-worker-failure", "continue", "--dist.sync_every=5",
                *train_args(data, out, train__epochs=40)]
        with launcher(args, tmp_path / "launch.log") as la:
            la.wait_log(rf"on {c.hosts[-1]} run: dptrain agent")
            keys = str(out / "agent-keys.json")
            common = ["--connect", endpoint, "--run", run_id, "--slots", "1", "--keys", keys]
            agents = [agent(c, h, ["--host-index", str(i), "--host-label", h, *common], tmp_path / f"{h}.log")
                      for i, h in enumerate(c.hosts)]
            try:
                la.wait_log("all 2 hosts ready")
                assert wait_until(lambda: len(step_records(out)) >= 3, 30), la.log()
                agents[1].kill()
                la.wait_log(r"mesh data plane \d+ over 1 hosts \(h1\)", 30)
                agents.append(agent(c, "h2", ["--join", "--host-label", "h2-again", *common], tmp_path / "again.log"))
                la.wait_log(r"host h2-again joins in place of rank 1 \(host h2\b", 30)
                assert la.wait(120) == 0, la.log() + agents[-1].log()
                assert agents[0].wait(15) == 0 and agents[-1].wait(15) == 0, agents[-1].log()
            finally:
                for a in agents:
                    a.close()
            log = la.log()
        assert re.search(r"rank 1 \(host h2-again, pid \d+\) is back after", log), log
        assert re.findall(r"mesh data plane \d+ over (\d) hosts", log)[-1] == "2", log
        assert "ranks 1..1" in (tmp_path / "again.log").read_text()
        assert [r["step"] for r in step_records(out)] == list(range(200))
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(150)
def test_fault_soak_on_a_cluster(data, tmp_path):
    """`dptrain soak --faults 2 --launch-args '--hostfile ...'`: a host's ssh session killed (the host is lost, its
    agent started again with --join takes its place) and the launcher interrupted (resumed): both trials complete
    and leave nothing, on 2 namespace hosts."""
    out = tmp_path / "faults"
    with cluster(2, slots=1) as c:
        launch_args = f"--hostfile {c.hostfile} --ssh-config {c.ssh_config} --bind {c.coordinator_addr}"
        cmd = [sys.executable, "-m", "dptrain", "soak", "--faults", "2", "--kinds", "kill,int", "--cycle",
               "--trial-steps", "30", "--trial-timeout", "60", "--batch-size", "16", "--config", str(TINY),
               "--data", str(data), f"--data.cache_dir={data.parent / 'cache'}", "--data.min_images_per_class=10",
               "--model.hidden=192", "--out", str(out), "--launch-args", launch_args]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=140)
        assert p.returncode == 0, p.stdout + p.stderr
        r = json.loads((out / "faults.json").read_text())
        kill, intr = r["trials"]
        assert kill["target"].startswith("host ") and kill["replaced"] >= 1 and kill["rc"] == [0], kill
        assert intr["rc"] == [130, 0] and intr["steps"] == 30, intr
        assert (r["passed"], r["failed"]) == (2, 0)
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


# ---- nobody without the run's client key reaches an agent's mesh socket -------------------------------------------
def _mesh_intruders(endpoint: str, server_key: str, run_id: str, stop: threading.Event, sent: list, got: list):
    """A plain DEALER and a CURVE client with the agent's (public) server key but a key pair of its own flood the
    agent's mesh socket with huge gradients and weights for every step until stopped."""
    import zmq
    ctx = zmq.Context()
    plain, rogue = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    rogue.curve_serverkey, rogue.curve_publickey, rogue.curve_secretkey = server_key.encode(), pub, sec
    for s in (plain, rogue):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 50)
        s.connect(endpoint)
    big = np.full(1 << 17, 1e4, np.float32)
    msgs = [P.encode(kind, run_id, step=step, rank=src, arrays={name: big}, attempt=0, mesh_id=1, src=src, lo=0,
                     hi=big.size, scale=1.0)
            for step in range(40) for src in (0, 1)
            for kind, name in ((P.Kind.SCATTER, "grad"), (P.Kind.GATHER, "params"))]
    flood([plain, rogue], msgs, stop, sent, got)
    ctx.term()


def _sealed_intruders(endpoint: str, run_id: str, stop: threading.Event, sent: list, got: list):
    """dist.bulk_cipher = "aes-gcm": the mesh socket has no CURVE, so anyone connects. A plain DEALER floods it with
    unsealed gradients and weights, and with sealed-looking ones (a valid envelope for every sender, receiver and
    plane 1, counters from 0 up, random bytes where the ciphertext and tag go)."""
    import zmq

    from dptrain.distributed.bulk import ENVELOPE, MAGIC, TAG
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.setsockopt(zmq.SNDHWM, 50)
    plain.connect(endpoint)
    big = np.full(1 << 17, 1e4, np.float32)
    rng = np.random.default_rng(0)
    msgs = [P.encode(kind, run_id, step=step, rank=src, arrays={name: big}, attempt=0, mesh_id=1, src=src, lo=0,
                     hi=big.size, scale=1.0)
            for step in range(20) for src in (0, 1)
            for kind, name in ((P.Kind.SCATTER, "grad"), (P.Kind.GATHER, "params"))]
    msgs += [[ENVELOPE.pack(MAGIC, 1, src, dst, c), rng.bytes(200 + TAG), rng.bytes(big.nbytes + TAG)]
             for c in range(0, 400, 2) for src, dst in ((0, 1), (1, 0))]
    flood([plain], msgs, stop, sent, got)
    ctx.term()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cipher", ["curve", "aes-gcm"])
def test_agent_mesh_socket_admits_only_the_run_key(data, tmp_path, cipher):
    """Intruders on host h2's mesh socket from its first step to the run's end: the weights are an undisturbed
    run's bit for bit and nothing comes back. "curve": they cannot complete the handshake; "aes-gcm": they connect,
    and every message they send is dropped and counted (none is authentic)."""
    results = {}
    with cluster(2, slots=1) as c:
        for name in ("clean", "attacked"):
            out = tmp_path / name
            stop, sent, got = threading.Event(), [0], []
            intruder = None
            with run_hosts(c, data, out, "--dist.sync_every=1", "--run-id", f"mesh{name}",
                           f"--dist.bulk_cipher={cipher}", train__steps_per_epoch=5, train__epochs=8) as la:
                if name == "attacked":
                    host_log = out / "logs" / "host-h2.log"
                    assert wait_until(lambda: host_log.exists() and "mesh endpoint" in host_log.read_text(), 30), \
                        la.log()
                    m = re.search(r"mesh endpoint (\S+), CURVE server key ([^\s,]+)", host_log.read_text())
                    if cipher == "curve":
                        intruder = threading.Thread(target=_mesh_intruders,
                                                    args=(m[1], m[2], f"mesh{name}", stop, sent, got))
                    else:
                        assert m[2] == "none"
                        intruder = threading.Thread(target=_sealed_intruders,
                                                    args=(m[1], f"mesh{name}", stop, sent, got))
                    intruder.start()
                try:
                    assert la.wait(60) == 0, la.log()
                finally:
                    stop.set()
                    if intruder is not None:
                        intruder.join(10)
            results[name] = params(out)
            if name == "attacked":
                assert sent[0] > 20 and got == []
                assert summary(out)["replica_checks"] == 40
                if cipher == "aes-gcm":  # they did reach the socket, and were refused there
                    assert "dropped a message from another host" in (out / "logs" / "host-h2.log").read_text()
    assert np.array_equal(results["clean"], results["attacked"])



# ---- a link that flaps -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("down_s, survives", [(2.0, True), (9.0, False)])
def test_link_flap_within_the_liveness_bound_is_ridden_out(data, tmp_path, down_s, survives):
    """h2's link goes down (both ends, no FIN/RST) and comes back: within the heartbeat bound (5 missed beats of
    1 s) TCP and ZeroMQ carry on and the run finishes every step; longer, h2 is a lost host under `abort`."""
    import subprocess as sp
    epochs, steps = 12, 60
    with cluster(2, slots=1) as c:
        out = tmp_path / "run"
        with run_hosts(c, data, out, train__epochs=epochs) as la:
            la.wait_log("all 2 hosts ready")
            assert wait_until(lambda: len(step_records(out)) >= 3, 30), la.log()
            ns = c.namespace("h2")
            sp.run(["ip", "link", "set", c.veth("h2"), "down"], check=True)
            sp.run(["ip", "-n", ns, "link", "set", "eth0", "down"], check=True)
            time.sleep(down_s)
            sp.run(["ip", "link", "set", c.veth("h2"), "up"], check=True)
            sp.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
            rc = la.wait(90)
            log = la.log()
        if survives:
            assert rc == 0, log
            assert [r["step"] for r in step_records(out)] == list(range(steps))
        else:
            assert rc == 1 and re.search(r"host h2\b.*dead", log), log
            assert (out / "last.npz").exists()
        assert wait_until(lambda: not dptrain_pids(c), 15), dptrain_pids(c)


# ---- the replicated factored layer's rule and pieces (no cluster) ------------------------------------------------
def test_replicate_pays_where_a_host_sends_fewer_bytes_at_a_small_batch():
    """auto: every host updates the factored Linear itself while its factors to every other host are fewer bytes
    than the owners' share of them plus the layer's all-gather, and the batch is at most REPLICATE_MAX_BATCH (the
    full-batch GEMM on every host); owners / replicated force it; one host never replicates."""
    from dptrain.distributed.mesh_layout import REPLICATE_MAX_BATCH, replicate_pays
    K, F = 16384, 512
    for B, H in ((16, 2), (16, 3), (96, 3), (96, 4), (256, 16)):
        b = -(-B // H)
        replicated = (H - 1) * b * (K + F) * 4
        owners = b * (K * (H - 1) / H + (H - 1) * F) * 4 + (H - 1) / H * K * F * 4
        assert replicated < owners and replicate_pays(B, H, K, F, 4)
    assert not replicate_pays(REPLICATE_MAX_BATCH + 1, 64, K, F, 4)  # the GEMM: B·K·F·2 flops on every host
    assert not replicate_pays(4096, 16, K, F, 4) and not replicate_pays(4096, 64, K, F, 4)
    # a narrow layer (1024 x 64) at batch 200 over 2 hosts: 100 samples' factors (435 kB) outweigh its gather
    assert not replicate_pays(200, 2, 1024, 64, 4)
    assert not replicate_pays(16, 3, K, F, 4, "owners") and replicate_pays(4096, 16, K, F, 4, "replicated")
    assert not replicate_pays(16, 1, K, F, 4, "replicated")


def test_gather_pieces_cut_at_the_factored_layer_and_cover_the_slice_once():
    from dptrain.distributed.mesh_layout import GATHER_PIECE, gather_pieces
    lo, hi, w0, w1 = 1000, 1000 + 3 * GATHER_PIECE + 17, 1000 + GATHER_PIECE + 5, 1000 + 2 * GATHER_PIECE + 300
    pieces = gather_pieces(lo, hi, (w0, w1))
    assert pieces[0][0] == lo and pieces[-1][1] == hi and all(a < b for a, b in pieces)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))  # contiguous, no overlap
    assert all(b - a <= GATHER_PIECE for a, b in pieces)
    assert all(b <= w0 or a >= w1 or (w0 <= a and b <= w1) for a, b in pieces)  # none straddles the layer
    assert gather_pieces(lo, hi) == [(a, min(a + GATHER_PIECE, hi)) for a in range(lo, hi, GATHER_PIECE)]  # no cuts


def test_plane_slices_balance_the_parameters_that_travel_and_sync_shares_the_replicated_layer():
    """With a replicated layer the slices are even in the other parameters (what the reduce-scatter and all-gather
    carry), on CHUNK boundaries, covering the buffer once; a SYNC uploads each host's slice without that layer plus
    an even share of it: together every element once, nobody the whole layer."""
    from dptrain.distributed.mesh_layout import plane_slices, sync_ranges
    from dptrain.optim import CHUNK, chunk_slices
    P, w0, w1 = 9_434_462, 1_013_248, 1_013_248 + 16384 * 512  # the default model's layout, roughly
    assert plane_slices(P, 3) == chunk_slices(P, 3)
    for H in (2, 3, 4, 16):
        cut = plane_slices(P, H, (w0, w1))
        assert cut[0][0] == 0 and cut[-1][1] == P and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
        assert all(lo % CHUNK == 0 for lo, _ in cut)
        rest = [sum(max(0, min(hi, e) - max(lo, s)) for s, e in ((0, w0), (w1, P))) for lo, hi in cut]
        assert max(rest) - min(rest) <= 2 * CHUNK  # even in what travels, to a block
        ranges = sync_ranges(cut, (w0, w1))
        flat = sorted(r for rs in ranges for r in rs)
        assert flat[0][0] == 0 and flat[-1][1] == P and all(a[1] == b[0] for a, b in zip(flat, flat[1:]))
        sizes = [sum(b - a for a, b in rs) for rs in ranges]
        assert max(sizes) - min(sizes) <= 2 * CHUNK + H  # and so is every host's upload


def test_the_coordinator_replicates_only_where_every_host_computes_the_same_gemm_bits():
    """MeshPlane.replicated: all hosts factor the same layer, report the same GEMM signature (CPU model, BLAS build,
    kernels, threads) and replicate_pays says so; hosts whose GEMMs may round differently keep the owners' way
    (each would run every owner's GEMM itself, and differing replicas stop the run at the next SYNC)."""
    from types import SimpleNamespace

    from dptrain.config import Config
    from dptrain.distributed.mesh_plane import MeshPlane
    from dptrain.nn.threads import gemm_signature
    cfg = Config()
    cfg.train.batch_size = 16
    me = gemm_signature()

    def plane(gemms, factor=(100, 16384, 512)):
        peers = {r: SimpleNamespace(mesh_factor=factor, mesh_gemm=g, host=f"h{r}") for r, g in enumerate(gemms)}
        return MeshPlane(SimpleNamespace(peers=peers), None, None, cfg)
    assert plane([me, me, me]).replicated((0, 1, 2)) == (100, 100 + 16384 * 512)
    assert plane([me, me, me.replace("]]", "x]]")]).replicated((0, 1, 2)) is None
    assert plane([me, me, me], factor=()).replicated((0, 1, 2)) is None
    cfg.train.batch_size = 4096  # the full-batch GEMM on every host does not pay
    assert plane([me, me, me]).replicated((0, 1, 2)) is None
