"""A real Slurm (Debian's slurm-wlm 22.05 + munge) on the namespace cluster of tests/netns.py, for tests/test_slurm.py.

One munged in the root namespace (its socket is a file: every namespace shares the filesystem), slurmctld in the
root namespace on the cluster's bridge address (the "head"), and one slurmd per namespace host, named h1, h2...
after the hosts. slurmd starts under `nsenter --net=/run/netns/NAME`: `ip netns exec` also remounts /sys, which
breaks slurmd. Everything lives in a fresh state folder per use (job ids start at 1 there), and
`AuthInfo=cred_expire=10` with a one-second scheduler keeps a requeued job from waiting two minutes to start again.

    with cluster(2, slots=2) as c, SlurmCluster(c, tmp_path / "slurm") as s:
        job = s.sbatch(["--nodes=2", "launch/slurm.sbatch", ...], cwd=tmp_path)
        s.wait_state(job, "COMPLETED", 120)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "srun", "munged", "nsenter")


def slurm_available() -> tuple[bool, str]:
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        return False, f"not installed: {', '.join(missing)} (slurm-wlm, munge; run .ci/install-system.sh)"
    return True, ""


def require_slurm() -> None:
    import pytest
    from netns import require_netns
    require_netns()
    ok, why = slurm_available()
    if not ok:
        if os.environ.get("DPTRAIN_REQUIRE_NETNS") == "1":
            pytest.fail(f"Slurm required (DPTRAIN_REQUIRE_NETNS=1) but unavailable: {why}")
        pytest.skip(f"Slurm unavailable: {why}")


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, netns_cluster, state: Path, cpus: int = 2):
        self.c, self.state, self.cpus = netns_cluster, Path(state), cpus
        self.conf = self.state / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.state / f"{name}.out", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def __enter__(self) -> SlurmCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        s, c = self.state, self.c
        s.mkdir(parents=True)
        key = s / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        # munged wants every directory above its socket searchable by all (pytest's tmp folders are 0700)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="dptrain-munge-"))
        os.chmod(self.sock_dir, 0o755)
        sock = self.sock_dir / "munge.socket"
        self._start("munged", ["munged", "-F", "--socket", str(sock), "--key-file", str(key),
                               "--pid-file", str(s / "munged.pid"), "--log-file", str(s / "munged.log"),
                               "--seed-file", str(s / "munged.seed")])
        (s / "ctld").mkdir()
        port = _free_port(c.coordinator_addr)
        nodes = "\n".join(f"NodeName={h} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN" for h, a in c.addresses.items())
        self.conf.write_text(f"""# written by tests/slurm_util.py
ClusterName=dpt{c.prefix[3:]}
SlurmctldHost={socket.gethostname().split('.')[0]}({c.coordinator_addr})
SlurmctldPort={port}
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/d.%n
SlurmctldPidFile={s}/ctld.pid
SlurmdPidFile={s}/d.%n.pid
SlurmctldLogFile={s}/ctld.log
SlurmdLogFile={s}/d.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/linear
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=10
SlurmdTimeout=60
{nodes}
PartitionName=p Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for h in c.hosts:
            self._start(f"slurmd-{h}", ["nsenter", f"--net=/run/netns/{c.namespace(h)}", "slurmd", "-D", "-N", h,
                                        "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while True:
            r = self.run(["sinfo", "-h", "-o", "%T %D"], check=False)
            if r.returncode == 0 and re.fullmatch(rf"idle {len(c.hosts)}\s*", r.stdout):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm not up in 60 s: {r.stdout}{r.stderr}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.state.glob("*.out")) + sorted(self.state.glob("*.log")))

    def run(self, argv: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: rc {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def sbatch(self, argv: list[str], cwd: Path, env: dict | None = None) -> int:
        r = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env=env or {})
        return int(r.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict:
        """`scontrol show job` as a dict of its KEY=VALUE fields."""
        r = self.run(["scontrol", "-o", "show", "job", str(job)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_state(self, job: int, states: str | tuple[str, ...], timeout_s: float) -> dict:
        states = (states,) if isinstance(states, str) else states
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job}: {info.get('JobState')} after {timeout_s} s, not {states}:\n"
                                     f"{info}\n{self.logs()}")
            time.sleep(0.2)

    def down(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs.clear()
        if getattr(self, "sock_dir", None) is not None:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        # jobs' processes (slurmstepd, scripts, agents) live in the namespaces: the netns cluster's down kills them
