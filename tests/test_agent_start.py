"""How an agent that a scheduler started finds its run: the key file (absent, another start's, the launcher's
failure note, unsafe modes) and its signals (never swallowed by a decode path). Real processes and files."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from distutil import Proc, cli_args

from dptrain.distributed import protocol as P
from dptrain.distributed.agent import AgentStop, StopSignals, default_label
from dptrain.distributed.curve import RunKeys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(tmp_path, keys, run, name="agent", extra=()):
    argv = [sys.executable, "-m", "dptrain", "agent", "--connect", f"tcp://127.0.0.1:{_free_port()}", "--run", run,
            "--host-index", "0", "--host-label", "hA", "--keys", str(keys), "--wait-keys-s", "60",
            "--wait-coordinator-s", "60", *extra]
    return Proc(argv, tmp_path / f"{name}.log")


@pytest.mark.timeout(60)
def test_a_previous_starts_key_file_is_waited_past_and_this_runs_file_used(tmp_path):
    path = tmp_path / "agent-keys.json"
    RunKeys.generate().write_agent_file(path, run="job7.0")  # what the first start of a requeued job left
    with _agent(tmp_path, path, "job7.1") as a:
        a.wait_log(r"waiting for the key file .*: it is for run 'job7\.0', not 'job7\.1'")
        time.sleep(1.0)
        assert a.proc.poll() is None and "waiting for the coordinator" not in a.log(), a.log()
        RunKeys.generate().write_agent_file(path, run="job7.1")
        a.wait_log(r"waiting for the coordinator at 127\.0\.0\.1")  # keys taken: on to the coordinator's port
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert not list(tmp_path.glob(".agent-keys.json.*"))  # written through a temporary name, renamed


@pytest.mark.timeout(60)
def test_unsafe_key_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "agent-keys.json"
    RunKeys.generate().write_agent_file(path, run="r1")
    os.chmod(path, 0o644)
    with _agent(tmp_path, path, "r1") as a:
        assert a.wait(30) == 1, a.log()
    assert f"host hA: key file {path} is mode 0644 lets others read or write it (chmod 600)" in a.log()
    assert "Traceback" not in a.log()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with _agent(tmp_path, fifo, "r1", "fifo") as a:
        assert a.wait(30) == 1, a.log()
    assert f"key file {fifo} is not a regular file" in a.log()


@pytest.mark.timeout(90)
def test_launcher_that_fails_before_the_keys_ends_the_waiting_agents_at_once(tmp_path, tiny_data):
    """A bad --data: the launcher writes the failure into the key file; agents started before it (as srun / mpirun
    start them) stop within seconds with its reason instead of waiting out --wait-keys-s."""
    out = tmp_path / "run"
    out.mkdir()
    RunKeys.generate().write_agent_file(out / "agent-keys.json", run="old")  # a stale file must not be read
    port = _free_port()
    agents = [Proc([sys.executable, "-m", "dptrain", "agent", "--connect", f"tcp://127.0.0.1:{port}", "--run",
                    "jobX", "--host-index", str(i), "--host-label", f"h{i}", "--keys", str(out / "agent-keys.json"),
                    "--wait-keys-s", "600"], tmp_path / f"agent{i}.log") for i in range(2)]
    try:
        for a in agents:
            a.wait_log("waiting for the key file")
        args = [a for a in cli_args(tiny_data, out) if not a.startswith("--data.path")]
        with Proc([sys.executable, "-m", "dptrain", "launch", "-H", "a:1,b:1", "--no-ssh", "--bind", "127.0.0.1",
                   "--port", str(port), "--run-id", "jobX", *args, "--data", str(tmp_path / "missing")],
                  tmp_path / "launch.log") as la:
            assert la.wait(60) == 1, la.log()
        t0 = time.monotonic()
        for a in agents:
            assert a.wait(20) == 1, a.log()
        assert time.monotonic() - t0 < 10
        for a in agents:
            assert "the launcher of run jobX failed before it wrote the keys: dptrain launch:" in a.log(), a.log()
            assert str(tmp_path / "missing") in a.log() and "Traceback" not in a.log()
        note = json.loads((out / "agent-keys.json").read_text())
        assert note["run"] == "jobX" and "client_secret" not in note
    finally:
        for a in agents:
            a.close()


def test_sigterm_inside_a_decode_is_not_swallowed(monkeypatch):
    """protocol.decode turns any Exception into a dropped message: the agent's stop signal must get through it."""
    assert not issubclass(AgentStop, Exception)
    raised = []

    def decode_interrupted(frames, run, limits):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while decoding, as a real SIGTERM would be
        for _ in range(1000):  # the handler runs between bytecodes: give it some
            time.sleep(0.001)
        raised.append("not interrupted")
        return None

    old = signal.signal(signal.SIGTERM, StopSignals("hA", 20.0, in_run=lambda: False))  # not welcomed: at once
    try:
        monkeypatch.setattr(P, "_decode", decode_interrupted)
        with pytest.raises(AgentStop):
            P.decode([b"x"], run="r")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert raised == []


def test_agent_names_itself_by_the_slurm_node_or_its_mpi_rank():
    host = socket.gethostname()
    assert default_label({"SLURMD_NODENAME": "node7", "OMPI_COMM_WORLD_RANK": "3"}) == "node7"
    assert default_label({"OMPI_COMM_WORLD_RANK": "3"}) == f"{host}-3"
    assert default_label({}) == host


def test_pre_made_keys_name_no_run_and_are_used_as_they_are(tmp_path):
    """`dptrain keys` (a Kubernetes Secret) makes keys before any run exists: no run in the file, none checked."""
    r = subprocess.run([sys.executable, "-m", "dptrain", "keys", "--out", str(tmp_path)], capture_output=True,
                       timeout=30)
    assert r.returncode == 0
    assert "run" not in json.loads((tmp_path / "agent.json").read_text())
