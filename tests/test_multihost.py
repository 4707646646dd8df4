"""Multi-host runs on a "cluster on one box": network namespaces with real sshd (tests/netns.py).

Each test brings up its own small cluster (well under a second) and tears it down even on failure; every launcher
and agent runs in its own session and is killed by its context manager. Tiny model, 1 BLAS thread per worker.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distutil import ROOT, flood
from gradcheck import rel_error
from kernels import kernel_env
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
from dptrain.distributed.versions import local_versions
from dptrain.launcher.hosts import FORWARD_PREFIXES

STEPS = 5  # steps of the equivalence runs: one epoch of the tiny data set (169 train images, batch 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    require_netns()
    return make_data(tmp_path_factory.mktemp("mhdata"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """1 host x 4 workers, sync BN, no augmentation, STEPS steps: what every 2 x 2 run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with launcher(["--workers", "4", "--bn", "sync", *train_args(data, out, train__steps_per_epoch=STEPS,
                                                                  train__epochs=1)],
                  out.parent / "launch.log") as la:
        assert la.wait(90) == 0, la.log()
    return params(out)


def two_by_two(c, data, out, *extra):
    return launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind", c.coordinator_addr,
                     "--bn", "sync", *extra, *train_args(data, out, train__steps_per_epoch=STEPS, train__epochs=1)],
                    out.parent / f"{out.name}.log")


# ---- 1. same weights as one host ---------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.numerics
def test_two_hosts_two_slots_match_one_host_four_workers(data, reference, tmp_path):
    with cluster(2, slots=2) as c:
        out = tmp_path / "run"
        with two_by_two(c, data, out) as la:
            assert la.wait(60) == 0, la.log()
        assert "all 2 hosts ready" in la.log() and "CURVE on" in la.log()
        assert len(step_records(out)) == STEPS
        assert rel_error(params(out), reference) < 1e-5
        assert (out / "logs" / "host-h1.log").exists() and (out / "logs" / "h2-rank3.log").exists()
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


# ---- 2/3/6. no-ssh mode: agents started by hand or by Slurm; intruders -----------------------------------------
def _intruders(endpoint: str, server_public: bytes, run_id: str, stop: threading.Event, got: list, sent: list):
    """A plain DEALER and a CURVE client with the right server key but a key pair of its own send HELLOs and
    RESULTs (huge gradients for every step) until stopped; whatever comes back is recorded."""
    import zmq
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    rogue = ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    rogue.curve_serverkey, rogue.curve_publickey, rogue.curve_secretkey = server_public, pub, sec
    socks = [plain, rogue]
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100)
        s.connect(endpoint)
    grad = np.full(39216, 1e3, np.float32)
    msgs = []
    for rank in (0, 1):
        msgs.append(P.encode(P.Kind.HELLO, run_id, rank=rank, role="agent", host="evil", pid=1, slots=2,
                             **local_versions()))
        msgs += [P.encode(P.Kind.RESULT, run_id, step=step, rank=rank, arrays={"grad": grad, "bn_moments": np.zeros(4)},
                          count=16, loss_sum=0.0, correct=16, grad_in="frame", grad_scale=1.0, timings={}, attempt=0,
                          phase="train")
                 for step in range(STEPS)]
    flood(socks, msgs, stop, sent, got)
    ctx.term()


def _no_ssh_run(c, data, tmp_path, ranks_from="host-index", intrude=False, cipher="curve"):
    out, run_id, port = tmp_path / "run", f"job{os.getpid()}{ranks_from[0]}", 29400 + os.getpid() % 500
    hosts = ",".join(f"{h}:{c.slots}" for h in c.hosts)
    args = ["-H", hosts, "--no-ssh", "--bind", c.coordinator_addr, "--port", str(port), "--run-id", run_id,
            "--wait-agents-s", "40", "--bn", "sync",
            *train_args(data, out, train__steps_per_epoch=STEPS, train__epochs=1, dist__bulk_cipher=cipher)]
    endpoint = f"tcp://{c.coordinator_addr}:{port}"
    stop, got, sent = threading.Event(), [], [0]
    with launcher(args, tmp_path / "launch.log") as la:
        la.wait_log(rf"\(run {run_id}\)")
        for i, h in enumerate(c.hosts):  # the launcher prints each host's command line
            la.wait_log(rf"on {h} run: dptrain agent --connect {re.escape(endpoint)} --run {run_id} --host-index {i} ")
        keys = out / "agent-keys.json"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        intruder = None
        if intrude:  # the server key is public (an attacker may know it): the client key is what counts
            import json
            server_public = json.loads(keys.read_text())["server_public"].encode()
            intruder = threading.Thread(target=_intruders, args=(endpoint, server_public, run_id, stop, got, sent))
            intruder.start()
            time.sleep(0.5)  # let the intruders try to join first
        agents = []
        try:
            for i, h in enumerate(c.hosts):
                common = ["--connect", endpoint, "--run", run_id, "--slots", str(c.slots), "--keys", str(keys),
                          "--host-label", h]
                if ranks_from == "slurm":  # one task per node: srun --ntasks-per-node=1
                    env = {"SLURM_PROCID": str(i), "SLURM_NTASKS": str(len(c.hosts)), "SLURM_LOCALID": "0",
                           "SLURM_NODEID": str(i)}
                    agents.append(agent(c, h, common, tmp_path / f"agent-{h}.log", env))
                elif ranks_from == "openmpi":  # mpirun --map-by ppr:1:node: NODE_RANK is 0 on every node
                    env = {"OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_SIZE": str(len(c.hosts)),
                           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
                           "OMPI_COMM_WORLD_NODE_RANK": "0"}
                    agents.append(agent(c, h, common, tmp_path / f"agent-{h}.log", env))
                else:
                    agents.append(agent(c, h, ["--host-index", str(i), *common], tmp_path / f"agent-{h}.log"))
            rc = la.wait(60)
            assert rc == 0, la.log() + "".join(a.log() for a in agents)
            for a in agents:
                assert a.wait(15) == 0, a.log()
        finally:
            stop.set()
            if intruder is not None:
                intruder.join(10)
            for a in agents:
                a.close()
    assert f"ranks {c.slots}..{2 * c.slots - 1}" in (tmp_path / "agent-h2.log").read_text()
    assert len(step_records(out)) == STEPS
    return out, la.log(), got, sent[0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ranks_from", ["host-index", "slurm", "openmpi"])
def test_no_ssh_agents_started_in_each_namespace(data, reference, tmp_path, ranks_from):
    with cluster(2, slots=2) as c:
        out, log, _, _ = _no_ssh_run(c, data, tmp_path, ranks_from)
        assert rel_error(params(out), reference) < 1e-5
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cipher", ["curve", "aes-gcm"])
def test_peer_without_the_key_cannot_join_or_inject(data, reference, tmp_path, cipher):
    """Intruders flood HELLOs and RESULTs from before the hosts join until the run ends: the weights are those of
    an undisturbed run, nobody named "evil" ever reached the coordinator, and the intruders got nothing back. With
    either bulk cipher: the coordinator's link keeps CURVE under "aes-gcm" (the mesh sockets' own intruders are
    test_mesh.py's)."""
    with cluster(2, slots=2) as c:
        out, log, got, sent = _no_ssh_run(c, data, tmp_path, intrude=True, cipher=cipher)
        assert sent > 20
        assert got == []
        assert "evil" not in log
        assert rel_error(params(out), reference) < 1e-5


# ---- 4. a host dies ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", ["abort", "continue"])
def test_host_killed_mid_run(data, tmp_path, policy):
    epochs, steps = 30, 150  # 5 steps an epoch
    with cluster(2, slots=1) as c:
        out = tmp_path / "run"
        args = ["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind", c.coordinator_addr,
                "--on-worker-failure", policy, *train_args(data, out, train__epochs=epochs)]
        with launcher(args, tmp_path / "launch.log") as la:
            la.wait_log("all 2 hosts ready")
            assert wait_until(lambda: len(step_records(out)) >= 3, 30), la.log()
            c.kill_host("h2")
            t0 = time.monotonic()
            rc = la.wait(60)
            took = time.monotonic() - t0
            log = la.log()
        if policy == "abort":
            assert rc == 1, log
            assert took < 15, (took, log)
            assert re.search(r"host h2\b.*dead", log), log
            assert (out / "last.npz").exists()
        else:
            assert rc == 0, log
            # noticed in a training step ("redoing the step on ...") or at the epoch's sync before evaluating
            assert re.search(r"lost rank 1 \(host h2\b.*; redoing the step.* on 1 surviving rank", log), log
            assert summary(out)["steps"] == steps
            assert [r["step"] for r in step_records(out)] == list(range(steps))
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


# ---- 5. preflight ------------------------------------------------------------------------------------------------
def _wrapper(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\nset -e\n" + body)
    path.chmod(0o755)
    return path


def _h2_with_mount(tmp_path: Path, c, mount: str) -> Path:
    """A python for the hosts that, on h2 only, first runs `mount` in a private mount namespace (the agent and its
    workers see it; nothing else does)."""
    return _wrapper(tmp_path, "py", f'if [ "$(ip netns identify $$)" = "{c.namespace("h2")}" ]; then\n'
                                    f'  exec unshare -m /bin/bash -c \'{mount} && exec {sys.executable} "$@"\' py "$@"\n'
                                    f'fi\nexec {sys.executable} "$@"\n')


def _launch_with_remote_python(c, py: Path, data: Path, out: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """A 2-host launch over ssh whose hosts run `py` as their python; returns (exit code, launcher log)."""
    with launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind", c.coordinator_addr,
                   "--remote-python", str(py), *extra, *train_args(data, out, train__steps_per_epoch=3)],
                  tmp_path / "launch.log") as la:
        la.wait(60)
    return la.proc.returncode, la.log()


@pytest.mark.timeout(90)
def test_environment_reaches_every_host(data, tmp_path):
    """-x NAME=VALUE, -x NAME (this value), ./.dptrain_env and OMP_* set here: each host's agent starts with them
    (its python is a wrapper that records what it got, then runs the real one). The kernel choices this session runs
    with (none in `make test`; OPENBLAS_CORETYPE, NPY_DISABLE_CPU_FEATURES under `make test-avx2`) reach the hosts
    too, and are part of the expected list, not of the caller's environment leaking into it. No value is on any
    command line meanwhile (`ps`, here and on the hosts: the namespaces share the process table): they go down ssh's
    stdin."""
    kern = {k: v for k, v in kernel_env().items() if k.startswith(FORWARD_PREFIXES)}
    with cluster(2, slots=1) as c:
        py = _wrapper(tmp_path, "py", f'echo "$(ip netns identify $$) $PROBE_A $PROBE_B $PROBE_C $OMP_PROC_BIND '
                                       f'$(grep -l "from_her[e]" /proc/[0-9]*/cmdline 2>/dev/null | wc -l)'
                                       f'|$OPENBLAS_CORETYPE|$NPY_DISABLE_CPU_FEATURES" >> {tmp_path}/seen\n'
                                       f'exec {sys.executable} "$@"\n')
        (ROOT / ".dptrain_env").write_text("PROBE_C=from_file\n")  # the launcher runs in ROOT
        try:
            os.environ.update(PROBE_B="from_here", OMP_PROC_BIND="close")
            rc, log = _launch_with_remote_python(c, py, data, tmp_path / "run", tmp_path, "-x", "PROBE_A=given",
                                                 "-x", "PROBE_B")
        finally:
            (ROOT / ".dptrain_env").unlink()
            for k in ("PROBE_B", "OMP_PROC_BIND"):
                os.environ.pop(k, None)
        assert rc == 0, log
        seen = sorted((tmp_path / "seen").read_text().split("\n")[:-1])
        tail = f"|{kern.get('OPENBLAS_CORETYPE', '')}|{kern.get('NPY_DISABLE_CPU_FEATURES', '')}"
        assert seen == [f"{c.namespace(h)} given from_here from_file close 0{tail}" for h in ("h1", "h2")], seen
        names = sorted({"OMP_PROC_BIND", "PROBE_A", "PROBE_B", "PROBE_C", *kern})
        assert f"environment forwarded to the hosts: {', '.join(names)}" in log


@pytest.mark.timeout(90)
def test_preflight_code_mismatch_names_host_and_check(data, tmp_path):
    """h2 runs a modified copy of the package (a wrapper cds into its parent: `python -m` imports from cwd)."""
    copy = tmp_path / "other"
    shutil.copytree(Path(P.__file__).parent.parent, copy / "dptrain", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "dptrain" / "distributed" / "protocol.py", "a") as f:
        f.write("\n# a local patch on one host\n")
    with cluster(2, slots=1) as c:
        py = _wrapper(tmp_path, "py", f'if [ "$(ip netns identify $$)" = "{c.namespace("h2")}" ]; then '
                                       f'cd {copy}; fi\nexec {sys.executable} "$@"\n')
        out = tmp_path / "run"
        rc, log = _launch_with_remote_python(c, py, data, out, tmp_path)
        assert rc != 0, log
        assert re.search(r"h2.*preflight failed: code hash", log), log
        assert "h1" not in " ".join(ln for ln in log.splitlines() if "code hash" in ln)
        assert step_records(out) == [] and not (out / "summary.json").exists()
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(90)
def test_preflight_missing_dataset_names_host_and_dataset(data, tmp_path):
    """On h2 only, an empty directory is bind-mounted over the dataset (private mount namespace)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with cluster(2, slots=1) as c:
        py = _h2_with_mount(tmp_path, c, f"mount --bind {empty} {data}")
        out = tmp_path / "run"
        rc, log = _launch_with_remote_python(c, py, data, out, tmp_path)
        assert rc != 0, log
        assert re.search(rf"host h2: preflight: dataset '{re.escape(str(data))}'", log), log
        assert not re.search(r"host h1: preflight", log), log
        assert step_records(out) == [] and not (out / "summary.json").exists()
        assert any(data.iterdir())  # the mount stayed inside h2's agent
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(90)
def test_small_dev_shm_on_one_host_is_one_line_naming_it(data, tmp_path):
    """On h2 only, /dev/shm is a 1 MB tmpfs (a container's small shared memory, in a private mount namespace): its
    agent checks what its segments need against that before making any, and the run stops with one line naming the
    host and both figures; no Bus error, nothing of the run left on either host."""
    with cluster(2, slots=1) as c:
        py = _h2_with_mount(tmp_path, c, "mount -t tmpfs -o size=1m tmpfs /dev/shm")
        out = tmp_path / "run"
        rc, log = _launch_with_remote_python(c, py, data, out, tmp_path)
        assert rc != 0, log
        assert re.search(r"host h2: dptrain: shared memory: .* need [0-9.,]+ MB, /dev/shm has [0-9.,]+ MB free", log), log
        assert "Bus error" not in log and "Traceback" not in log, log
        assert not re.search(r"host h1: dptrain: shared memory", log), log
        assert step_records(out) == [] and not (out / "summary.json").exists()
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)


@pytest.mark.timeout(60)
def test_ssh_failures_one_line_per_host_and_fast(data, tmp_path):
    with cluster(2, slots=1) as c:
        # a key that no host authorizes, and a host that does not resolve
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
        cfg = c.ssh_config.read_text().replace(str(c.identity), str(tmp_path / "stranger"))
        (tmp_path / "ssh_config").write_text(cfg)
        out = tmp_path / "run"
        t0 = time.monotonic()
        with launcher(["-H", "h1:1,h2:1,nosuchhost.invalid:1", "--ssh-config", str(tmp_path / "ssh_config"),
                       "--bind", c.coordinator_addr, *train_args(data, out, train__steps_per_epoch=3)],
                      tmp_path / "launch.log") as la:
            rc = la.wait(40)
        took = time.monotonic() - t0
        log = la.log()
        assert rc != 0, log
        assert took < 20, (took, log)
        failed = [ln for ln in log.splitlines() if "ssh failed" in ln]
        for h, why in (("h1", "Permission denied"), ("h2", "Permission denied"),
                       ("nosuchhost.invalid", "Could not resolve")):
            lines = [ln for ln in failed if f"host {h}:" in ln]
            assert len(lines) == 1 and why in lines[0], log
        assert step_records(out) == [] and not (out / "last.npz").exists()


# ---- 7. Ctrl-C ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ctrl_c_stops_every_remote_process(data, tmp_path):
    with cluster(2, slots=2) as c:
        out = tmp_path / "run"
        with launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind",
                       c.coordinator_addr, *train_args(data, out, train__epochs=1000)],
                      tmp_path / "launch.log") as la:
            la.wait_log("all 2 hosts ready")
            assert wait_until(lambda: len(step_records(out)) >= 2, 30), la.log()
            assert all(any("agent" in p for p in ps) for ps in dptrain_pids(c).values()) and len(dptrain_pids(c)) == 2
            os.kill(la.pid, signal.SIGINT)
            rc = la.wait(30)
        assert rc == 130, la.log()
        assert (out / "last.npz").exists()
        assert wait_until(lambda: not dptrain_pids(c), 10), dptrain_pids(c)
