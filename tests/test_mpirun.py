"""launch/mpirun.sh under a real Open MPI (Debian's openmpi-bin) over the namespace cluster's sshd (tests/netns.py).

2 hosts x 2 slots, tiny model: a run to the end whose workers may use every core of their host (read from
/proc/PID/status while it runs) with the same final weights as the ssh launch of the same layout; --exclude
applied to the hostfile both mpirun and dptrain read; a bad filter and a bad --data ending the job within seconds;
the script's exit status that of the job, mpirun's included.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_util import ROOT, launcher, make_data, params, step_records, train_args, wait_until
from netns import cluster, require_netns

SCRIPT = ROOT / "launch" / "mpirun.sh"
STEPS = 5


def require_mpirun() -> None:
    require_netns()
    for tool in ("mpirun", "orted"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            why = f"'{tool}' not installed (openmpi-bin; run .ci/install-system.sh)"
            if os.environ.get("DPTRAIN_REQUIRE_NETNS") == "1":
                pytest.fail(f"Open MPI required (DPTRAIN_REQUIRE_NETNS=1) but unavailable: {why}")
            pytest.skip(why)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    require_mpirun()
    return make_data(tmp_path_factory.mktemp("mpidata"))


def mpi_env(c) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # unset: no `-x PYTHONPATH` warning
    return env | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                  "OMPI_MCA_plm_rsh_agent": f"ssh -F {c.ssh_config}", "PY": sys.executable,
                  "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PORT": "29512", "WAIT_S": "60"}


def job_args(data: Path, **extra) -> list[str]:
    return [a for a in train_args(data, Path("unused"), **extra) if not a.startswith("--train.out=")]


def _interruptible() -> None:
    """Ctrl-C as from a terminal: not ignored. A test session started where SIGINT is ignored (a background job of
    a shell without job control, e.g. `nohup make test &`) passes that on, and bash cannot trap a signal ignored at
    its start: the script's trap never ran and the job went on to its end (seen: this test failed that way under a
    backgrounded `make test`, and passes there with this)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mpirun_sh(c, run: Path, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), str(c.hostfile), c.coordinator_addr, *args],
                            env=mpi_env(c) | {"RUN": str(run)}, cwd=ROOT, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_interruptible)


def finish(p: subprocess.Popen, timeout_s: float, log: Path) -> int:
    try:
        return p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        raise AssertionError(f"mpirun.sh still running after {timeout_s} s:\n{log.read_text(errors='replace')}")
    finally:
        try:
            os.killpg(p.pid, 9)  # whatever it left in this session (mpirun, its ssh)
        except ProcessLookupError:
            pass


def cpu_list(text: str) -> set[int]:
    out = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def dptrain_procs(c) -> dict[int, tuple[str, set[int]]]:
    """pid -> (command line, Cpus_allowed_list) of every agent and worker in the cluster's namespaces."""
    out = {}
    for h in c.hosts:
        for pid in c.pids(h):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if re.match(r"\S*python\S* -m dptrain (agent|worker) ", cmd):  # not the bash -c that execs one
                out[pid] = (f"{h}: {cmd}", cpu_list(re.search(r"Cpus_allowed_list:\s*(\S+)", status).group(1)))
    return out


@pytest.mark.timeout(240)
def test_mpirun_runs_to_the_end_unbound_like_the_ssh_launch(data, tmp_path):
    args = job_args(data, train__steps_per_epoch=STEPS, train__epochs=3)
    all_cpus = set(os.sched_getaffinity(0))
    seen: dict[int, tuple[str, set[int]]] = {}
    stop = threading.Event()

    def watch(c):
        while not stop.is_set():
            seen.update(dptrain_procs(c))
            time.sleep(0.2)

    with cluster(2, slots=2) as c:
        run, log = tmp_path / "run", tmp_path / "mpirun.log"
        p = mpirun_sh(c, run, args, log)
        watcher = threading.Thread(target=watch, args=(c,), daemon=True)
        watcher.start()
        try:
            rc = finish(p, 150, log)
        finally:
            stop.set()
            watcher.join(5)
        out = log.read_text(errors="replace")
        assert rc == 0, out
        ssh_run = tmp_path / "ssh"
        ssh_args = job_args(data, train__steps_per_epoch=STEPS, train__epochs=3)
        with launcher(["--hostfile", str(c.hostfile), "--ssh-config", str(c.ssh_config), "--bind",
                       c.coordinator_addr, *ssh_args, f"--train.out={ssh_run}"], tmp_path / "ssh.log") as la:
            assert la.wait(90) == 0, la.log()
    assert "mpirun.sh: dptrain launch exited 0, mpirun 0" in out
    assert "PYTHONPATH" not in out, out
    assert "host h1: 2 workers ready (ranks 0..1)" in out and "host h2: 2 workers ready (ranks 2..3)" in out, out
    assert len(step_records(run)) == 3 * STEPS
    workers = {pid: v for pid, v in seen.items() if " worker " in v[0]}
    agents = {pid: v for pid, v in seen.items() if " agent " in v[0]}
    assert len(workers) == 4 and len(agents) == 2, seen
    for pid, (cmd, cpus) in seen.items():  # --bind-to none: each may use every core this machine gives us
        assert cpus == all_cpus, (cmd, sorted(cpus), sorted(all_cpus))
    assert np.array_equal(params(run), params(ssh_run))  # the layout fixes every sum: the same bits


@pytest.mark.timeout(180)
def test_exclude_is_applied_to_the_hostfile_both_read(data, tmp_path):
    with cluster(2, slots=2) as c:
        run, log = tmp_path / "run", tmp_path / "mpirun.log"
        rc = finish(mpirun_sh(c, run, ["--exclude", "h2:1", *job_args(data, train__steps_per_epoch=STEPS,
                                                                              train__epochs=1)], log), 120, log)
        out = log.read_text(errors="replace")
        assert rc == 0, out
        assert "host h2: 1 workers ready (ranks 2..2)" in out, out
        assert (run / "hostfile").read_text() == "h1 slots=2\nh2 slots=1\n"
        assert len(step_records(run)) == STEPS

        t0 = time.monotonic()
        bad = tmp_path / "bad.log"
        rc = finish(mpirun_sh(c, tmp_path / "run2", ["--include", "h9", *job_args(data)], bad), 30, bad)
        out = bad.read_text(errors="replace")
        assert rc == 2 and "mpirun.sh: filter names host 'h9', which is not in the host list" in out, out
        assert time.monotonic() - t0 < 20


@pytest.mark.timeout(180)
def test_early_launcher_failure_and_mpirun_failure_end_the_job_with_their_status(data, tmp_path):
    with cluster(2, slots=2) as c:
        # a bad --data: the launcher fails before it writes the keys; the agents learn it from the key file
        run, log = tmp_path / "run", tmp_path / "mpirun.log"
        t0 = time.monotonic()
        rc = finish(mpirun_sh(c, run, [*(a for a in job_args(data) if not a.startswith("--data.path=")),
                                           "--data", str(tmp_path / "missing")], log), 90, log)
        took = time.monotonic() - t0
        out = log.read_text(errors="replace")
        assert rc == 1, out
        assert out.count("the launcher of run") == 2 and "failed before it wrote the keys" in out, out
        assert took < 45, (took, out)  # not WAIT_S (60 s) of agents waiting for keys that never come

        # mpirun fails (a host ssh cannot reach) while the launcher waits for its agents: mpirun's status
        hostfile = tmp_path / "hosts"
        hostfile.write_text("h1 slots=2\nnosuchhost slots=2\n")
        log2 = tmp_path / "mpirun2.log"
        t0 = time.monotonic()
        p = subprocess.Popen(["bash", str(SCRIPT), str(hostfile), c.coordinator_addr, *job_args(data)],
                             env=mpi_env(c) | {"RUN": str(tmp_path / "run2")}, cwd=ROOT, stdout=open(log2, "wb"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        rc = finish(p, 90, log2)
        out = log2.read_text(errors="replace")
        m = re.search(r"mpirun exited (\d+) before the launcher", out)
        assert m and rc == int(m.group(1)) != 0, out
        assert time.monotonic() - t0 < 60, out


@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_job_once_in_order(data, tmp_path):
    """Ctrl-C reaches the script (the terminal's process group; the launcher and mpirun have sessions of their
    own): the launcher gets one TERM from the script, finishes its step and writes last.npz with every host's
    state, and its STOP ends the agents, hence mpirun, in order."""
    with cluster(2, slots=2) as c:
        run, log = tmp_path / "run", tmp_path / "mpirun.log"
        p = mpirun_sh(c, run, job_args(data, train__epochs=300), log)
        try:
            assert wait_until(lambda: len(step_records(run)) >= 3, 90), log.read_text(errors="replace")
            os.killpg(p.pid, signal.SIGINT)
            rc = finish(p, 60, log)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        out = log.read_text(errors="replace")
    assert rc == 130 and "dptrain launch exited 130, mpirun 0" in out, out
    assert "could not be brought in" not in out and "Traceback" not in out, out
    assert out.count("signal 15: finishing this step") == 1, out
    assert (run / "last.npz").exists()
