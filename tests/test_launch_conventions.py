"""Launching like torchrun, mpirun and Kubernetes users expect: their variables and spellings.

The Kubernetes manifest (launch/kubernetes.yaml) is parsed and its commands and environment are run for real on
this host: the coordinator Pod's command (pre-made keys, no ssh) and the Indexed Job's agents (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, DPTRAIN_RUN_ID), with only the addresses and paths swapped for local ones.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distutil import ROOT, TINY, Proc, cli_args, step_records

from dptrain.cli import build_parser
from dptrain.distributed.rankenv import RankEnvError, coordinator_from_env, from_env

yaml = pytest.importorskip("yaml")


def test_torchrun_variables_give_the_rank_and_the_coordinator():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "GROUP_RANK": "3", "MASTER_ADDR": "head",
           "MASTER_PORT": "29500"}
    r = from_env(env)
    assert (r.source, r.rank, r.world_size, r.node_rank, r.local_rank) == ("torchrun", 3, 4, 3, 0)
    assert coordinator_from_env(env) == "tcp://head:29500"
    assert from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "RANK": "0",
                     "WORLD_SIZE": "2"}).source == "slurm"  # a scheduler's own variables win over the generic ones
    assert coordinator_from_env({}) is None
    with pytest.raises(RankEnvError, match="MASTER_PORT"):
        coordinator_from_env({"MASTER_ADDR": "head", "MASTER_PORT": "http"})
    with pytest.raises(RankEnvError, match="RANK=4 is not below WORLD_SIZE=4"):
        from_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("argv, workers", [(["launch", "-np", "3"], 3), (["launch", "--nproc-per-node", "4"], 4),
                                           (["launch", "--nproc_per_node", "5"], 5), (["launch", "--workers", "2"], 2)])
def test_mpirun_and_torchrun_spellings_of_workers(argv, workers):
    from dptrain.flags import resolve_config
    args, extra = build_parser().parse_known_args(argv)
    assert resolve_config(args, extra).dist.workers == workers  # one host: -np N is N workers, like --workers N


def test_np_is_the_total_filled_host_by_host():
    """mpirun / horovodrun: `-np 6 -H a:4,b:4` is 6 workers, a's 4 then 2 of b's; more than the slots is refused."""
    from dptrain.distributed.hostfile import HostfileError, HostSlots, filter_hosts, first_slots, parse_hosts
    hosts = parse_hosts("a:4,b:4,c:2")
    assert first_slots(hosts, 6) == [HostSlots("a", 4), HostSlots("b", 2)]
    assert first_slots(hosts, 10) == hosts
    assert first_slots(hosts, 3) == [HostSlots("a", 3)]
    assert first_slots(filter_hosts(hosts, exclude="a:0"), 4) == [HostSlots("a", 3, (1, 2, 3)), HostSlots("b", 1)]
    with pytest.raises(HostfileError, match=r"-np 11 is more than the 10 slots of -H x \(a:4, b:4, c:2\)"):
        first_slots(hosts, 11, "-H x")
    with pytest.raises(HostfileError, match="at least 1"):
        first_slots(hosts, 0)


@pytest.mark.parametrize("extra, words", [
    (["-np", "9", "-H", "a:4,b:4"], "dptrain launch: -np 9 is more than the 8 slots of -H a:4,b:4 (a:4, b:4)"),
    (["--workers", "2", "-H", "a:4,b:4"], "dptrain launch: --workers/--nproc-per-node 2 is per host, but -H a:4,b:4 "
                                         "gives a:4, b:4"),
    (["-np", "3", "--workers", "2"], "dptrain launch: -np 3 and --workers 2 disagree"),
    (["--bind", "no-such-host.invalid", "-H", "a:1"], "dptrain launch: --bind no-such-host.invalid: cannot resolve"),
    (["--bind", "::1", "-H", "a:1"], "--bind ::1: IPv6 addresses are not supported"),
    (["--bind", "192.0.2.1", "--port", "0", "--no-ssh", "-H", "a:1"], "cannot listen on tcp://192.0.2.1"),
])
def test_launch_conventions_refused_in_one_line(tiny_data, tmp_path, extra, words):
    from distutil import cli_args
    r = subprocess.run([sys.executable, "-m", "dptrain", "launch", *extra, *cli_args(tiny_data, tmp_path / "run")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.timeout(150)
def test_np_with_hosts_runs_that_many_workers_and_bind_takes_a_host_name(tiny_data, tmp_path):
    """`launch --no-ssh -np 3 -H a:2,b:2 --bind localhost`: the printed agent commands (run here, as each host
    would) bring 2 and 1 slots, the run ends with 3 workers (ranks a 0..1, b 2), and the coordinator listens on
    localhost's address."""
    import re
    import shlex
    port, out = _free_port(), tmp_path / "run"
    tiny = ["--train.epochs=1", "--train.steps_per_epoch=2", "--dist.blas_threads=1"]
    argv = [sys.executable, "-m", "dptrain", "launch", "--no-ssh", "-np", "3", "-H", "a:2,b:2", "--bind", "localhost",
            "--port", str(port), *cli_args(tiny_data, out), *tiny]
    agents = []
    with Proc(argv, tmp_path / "launch.log") as coord:
        coord.wait_log(f"coordinator listening on tcp://127.0.0.1:{port} .* 2 hosts, 3 workers", 60)
        coord.wait_log(r"on b run: ")
        lines = re.findall(r"on (a|b) run: (.*)", coord.log())
        try:
            for host, line in lines:
                cmd = shlex.split(line)
                assert cmd[:2] == ["dptrain", "agent"]
                assert cmd[cmd.index("--slots") + 1] == {"a": "2", "b": "1"}[host]
                agents.append(Proc([sys.executable, "-m", "dptrain", *cmd[1:]], tmp_path / f"agent-{host}.log"))
            assert coord.wait(120) == 0, coord.log() + "".join(a.log() for a in agents)
            for a in agents:
                assert a.wait(30) == 0, a.log()
        finally:
            for a in agents:
                a.close()
    assert "worker ranks: a 0..1, b 2..2" in coord.log()
    assert sorted(p.name for p in (out / "logs").glob("*-rank*.log")) == ["a-rank0.log", "a-rank1.log", "b-rank2.log"]
    assert len(step_records(out)) == 2


def test_resume_auto_starts_fresh_and_plain_resume_wants_a_checkpoint(tiny_data, tmp_path):
    from distutil import cli_args
    run = tmp_path / "run"
    base = [sys.executable, "-m", "dptrain", "train", *cli_args(tiny_data, run, train__epochs=1,
                                                                 train__steps_per_epoch=2)]
    strict = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1 and "last.npz does not exist (--resume auto starts fresh" in strict.stderr
    auto = subprocess.run(base + ["--resume", "auto"], capture_output=True, text=True, timeout=60)
    assert auto.returncode == 0, auto.stderr
    assert "no " in auto.stderr and "starting fresh" in auto.stderr and (run / "last.npz").exists()
    again = subprocess.run(base + ["--resume", "auto"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "resumed from" in again.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _swap(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def _mounted_from(pod_spec: dict, container: dict, path: str) -> dict:
    """The Pod volume that holds `path` in `container` (by the longest mountPath that is a prefix of it)."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of {container['name']}"
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next(v for v in pod_spec["volumes"] if v["name"] == name)


@pytest.mark.timeout(150)
def test_kubernetes_manifest_runs_with_agents_started_before_the_coordinator(tiny_data, tmp_path):
    """Pods start in any order: the agents start first (their coordinator's port is closed), wait with backoff,
    and the run finishes once the coordinator comes up seconds later."""
    text = (ROOT / "launch" / "kubernetes.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Service", "Pod", "Job"}
    coord_spec = kinds["Pod"]["spec"]["containers"][0]
    job = kinds["Job"]["spec"]
    agent_pod = job["template"]["spec"]
    agent_spec = agent_pod["containers"][0]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    # one agent per node: a required anti-affinity on the node's host name against the agents' own label
    anti = agent_pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and
               t["labelSelector"]["matchLabels"].items() <= job["template"]["metadata"]["labels"].items()
               for t in anti), anti
    # the config the docs give (configs/lfw.toml) reaches the coordinator from the ConfigMap the header makes
    cmd = coord_spec["command"]
    config_path = cmd[cmd.index("--config") + 1]
    volume = _mounted_from(kinds["Pod"]["spec"], coord_spec, config_path)
    made = re.search(r"kubectl create configmap (\S+) --from-file=(\S+)", text)
    assert made and volume["configMap"]["name"] == made.group(1), (volume, made)
    assert (ROOT / made.group(2)).is_file() and config_path.endswith("/" + Path(made.group(2)).name)
    assert "--config configs/lfw.toml" in (ROOT / "launch" / "README.md").read_text()
    env = {e["name"]: e.get("value") for e in agent_spec["env"]}
    assert env["RANK"] is None  # from the completion index annotation
    assert [e for e in agent_spec["env"] if e["name"] == "RANK"][0]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    hosts = int(env["WORLD_SIZE"])
    assert hosts == job["completions"] == len(cmd[cmd.index("-H") + 1].split(","))
    assert kinds["Service"]["spec"]["ports"][0]["port"] == int(env["MASTER_PORT"])

    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "dptrain", "keys", "--out", str(keys)], capture_output=True,
                          text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    for f in ("coordinator.json", "agent.json"):
        assert stat.S_IMODE((keys / f).stat().st_mode) == 0o600
    assert "server_secret" not in json.loads((keys / "agent.json").read_text())

    port, out = _free_port(), tmp_path / "runs" / "demo"
    tiny = ["--data.cache_dir", str(tiny_data.parent / "cache"), "--train.epochs=1",
            "--train.steps_per_epoch=3", "--train.progress=false", "--dist.blas_threads=1"]
    cmd = _swap(_swap(_swap(_swap(cmd, "--bind", "127.0.0.1"), "--port", str(port)), "--data", str(tiny_data)),
                "--out", str(out))
    cmd = _swap(_swap(cmd, "--keys", str(keys / "coordinator.json")), "--config", str(TINY))
    assert cmd[:2] == ["dptrain", "launch"]
    agents = []
    try:
        for i in range(hosts):
            a_env = {**env, "RANK": str(i), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            a_cmd = _swap(agent_spec["command"], "--keys", str(keys / "agent.json"))
            assert a_cmd[:2] == ["dptrain", "agent"] and "--connect" not in a_cmd and "--host-index" not in a_cmd
            agents.append(Proc([sys.executable, "-m", "dptrain", *a_cmd[1:], "--host-label", f"agent-{i}"],
                               tmp_path / f"agent-{i}.log", {**os.environ, **a_env}))
        for a in agents:  # refused, and waiting (not exited)
            a.wait_log(rf"waiting for the coordinator at 127\.0\.0\.1:{port} \(.*refused.*; up to 600 s\)")
        time.sleep(2.0)  # a few more refused tries, backing off
        assert all(a.proc.poll() is None for a in agents), "".join(a.log() for a in agents)
        with Proc([sys.executable, "-m", "dptrain", *cmd[1:], *tiny], tmp_path / "coordinator.log") as coord:
            assert coord.wait(120) == 0, coord.log() + "".join(a.log() for a in agents)
        for a in agents:
            assert a.wait(20) == 0, a.log()
    finally:
        for a in agents:
            a.close()
    assert len(step_records(out)) == 3
    assert f"all {hosts} hosts ready" in coord.log()
    assert "ranks 2..3" in (tmp_path / "agent-1.log").read_text()


@pytest.mark.timeout(60)
def test_agent_that_never_sees_its_coordinator_stops_at_the_deadline_naming_it(tmp_path):
    port = _free_port()
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "dptrain", "keys", "--out", str(keys)], capture_output=True, timeout=30,
                   check=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dptrain", "agent", "--connect", f"tcp://127.0.0.1:{port}", "--run",
                        "r1", "--host-index", "0", "--keys", str(keys / "agent.json"), "--wait-coordinator-s", "3"],
                       capture_output=True, text=True, timeout=40)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"cannot reach the coordinator at 127.0.0.1:{port} for 3 s (--wait-coordinator-s)" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert 3 <= took < 30, took


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["train", "launch"])
def test_checkpoint_signal_saves_and_exits_preempted_then_resume_auto_continues(tiny_data, tmp_path, how):
    """Slurm's --signal=USR1 before the time limit: the step finishes, last.npz is written, exit 75 (requeue me);
    the requeued job's `--resume auto` carries on from there."""
    import signal
    import time

    from distutil import cli_args, wait_steps
    run = tmp_path / "run"
    extra = ["--workers", "2"] if how == "launch" else []
    argv = [sys.executable, "-m", "dptrain", how, *extra, "--checkpoint-signal", "USR1", "--resume", "auto",
            *cli_args(tiny_data, run, train__epochs=300)]
    with Proc(argv, tmp_path / "first.log") as p:
        wait_steps(run, 3)
        time.sleep(0.2)
        p.proc.send_signal(signal.SIGUSR1)
        assert p.wait(60) == 75, p.log()
    done = len(step_records(run))
    assert (run / "last.npz").exists() and json.loads((run / "summary.json").read_text())["preempted"] is True
    argv2 = [a if a != "--train.epochs=300" else "--train.epochs=2" for a in argv]
    with Proc(argv2, tmp_path / "second.log") as p:
        code = p.wait(60)
        log = p.log()
    assert code == 0, log
    assert "resumed from" in log and len(step_records(run)) >= done
