"""A cluster of namespace hosts on this machine for benchmarks: launch/netns-cluster.sh driven from Python.

`Cluster(n, slots)` brings up n namespace "hosts" (own address, sshd, veth to one bridge; root only), shapes their
links (`shape(rate)`: tbf both ways), reads a host's link counters (`link_bytes`) and always tears down (context
manager, atexit, and `cleanup_stale` for clusters of benches that were SIGKILLed). `Job` runs a command in its own
session, optionally inside a namespace, with its output in a log file and a hard timeout.
"""
from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .. import log

REPO = Path(__file__).resolve().parents[2]  # dptrain/bench/ -> the checkout
SCRIPT = REPO / "launch" / "netns-cluster.sh"
STATE_BASE = Path(os.environ.get("DPTRAIN_BENCH_HOSTS_DIR", "/tmp/dptrain-bench-hosts"))


class BenchError(RuntimeError):
    pass


# ---- processes ----------------------------------------------------------------------------------------------------
class Job:
    """A command in its own session (optionally inside a namespace), output to a log file; stop() kills its group."""

    def __init__(self, argv: list[str], log_path: Path, ns: str | None = None, env: dict | None = None):
        self.argv = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as f:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **(env or {})})

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return "\n".join("    " + ln for ln in lines[-n:])

    def failure(self, what: str) -> BenchError:
        return BenchError(f"{what}\n  command: {shlex.join(self.argv)}\n  log {self.log_path}, last lines:\n"
                          f"{self.tail()}")

    def wait(self, timeout_s: float, what: str) -> None:
        try:
            rc = self.proc.wait(max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            self.stop()
            raise self.failure(f"{what}: still running after its {timeout_s:.0f} s timeout (killed)") from None
        if rc != 0:
            raise self.failure(f"{what}: exit {rc}")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout_s:.0f} s: {shlex.join(argv)}") from e


# ---- the cluster --------------------------------------------------------------------------------------------------
_live: set = set()
_counter = 0


class Cluster:
    """H+1 namespace hosts from launch/netns-cluster.sh, shaped; a context manager that always tears down."""

    def __init__(self, n: int, slots: int):
        global _counter
        _counter += 1
        self.n, self.slots = n, slots
        self.prefix = f"dpb{_base36(os.getpid())}{_base36(_counter % 36)}"[:9]
        self.state = STATE_BASE / self.prefix
        self.subnet = ""
        self.ssh_config = self.state / "ssh_config"

    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def __enter__(self) -> Cluster:
        _live.add(self)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        STATE_BASE.mkdir(parents=True, exist_ok=True)
        os.chmod(STATE_BASE, 0o700)
        last = ""
        for subnet in _free_subnets()[:3]:  # the script refuses a subnet in use (a cluster coming up meanwhile)
            r = _run(["bash", str(SCRIPT), "up", str(self.n), "--prefix", self.prefix, "--subnet", subnet,
                      "--slots", str(self.slots), "--state", str(self.state), "--owner-pid", str(os.getpid())], 120)
            if r.returncode == 0:
                self.subnet = subnet
                return
            last = (r.stdout + r.stderr).strip()
            if "collides" not in last and "route for" not in last:
                break
        raise BenchError(f"netns-cluster.sh up {self.n} failed:\n{last}")

    def shape(self, rate: str) -> None:
        for i in range(1, self.n + 1):
            r = _run(["bash", str(SCRIPT), "netem", f"h{i}", "--rate", rate, "--state", str(self.state)], 30)
            if r.returncode != 0:
                raise BenchError(f"netns-cluster.sh netem h{i} --rate {rate} failed:\n{(r.stdout + r.stderr).strip()}")

    def link_bytes(self, i: int) -> dict[str, int]:
        """Bytes host i has sent ("out") and received ("in") so far, from its veth peer in the root namespace
        (the same counters as eth0 inside the host, read without a process per sample)."""
        base = f"/sys/class/net/{self.prefix}-v{i}/statistics"
        with open(f"{base}/rx_bytes") as rx, open(f"{base}/tx_bytes") as tx:
            return {"out": int(rx.read()), "in": int(tx.read())}

    def zmq_io_ticks(self) -> dict[int, dict[tuple[int, int], tuple[int, int]]]:
        """{host i: {(pid, tid): (user, system) clock ticks}} of every ZeroMQ I/O thread (libzmq names them
        ZMQbg/IO/n) of the processes in each host's network namespace, one pass over /proc: see io_cpu_s."""
        pids = namespace_pids({i: f"/run/netns/{self.ns(i)}" for i in range(1, self.n + 1)})
        return {i: zmq_io_ticks(p) for i, p in pids.items()}

    def down(self) -> None:
        """Kill everything in the namespaces, delete them (idempotent); Ctrl-C cannot interrupt it."""
        if self not in _live:
            return
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            r = _run(["bash", str(SCRIPT), "down", "--prefix", self.prefix, "--state", str(self.state)], 120)
            if r.returncode != 0:
                log.get().error(f"netns-cluster.sh down --prefix {self.prefix} failed: {(r.stdout + r.stderr)[-500:]}")
            shutil.rmtree(self.state, ignore_errors=True)
        finally:
            _live.discard(self)
            signal.signal(signal.SIGINT, old)


def _base36(n: int) -> str:
    digits, out = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _free_subnets() -> list[str]:
    """10.213.X (X = 200..254) not on any address or route of this machine nor another cluster's state."""
    import ipaddress
    used = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for word in _run(argv, 10).stdout.split():
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word):
                net = ipaddress.ip_network(word, strict=False)
                used.append(net.supernet(new_prefix=24) if net.prefixlen > 24 else net)
    for env in list(STATE_BASE.glob("*/cluster.env")) + list(Path("/tmp/dptrain-netns-test").glob("*/cluster.env")):
        m = re.search(r"^SUBNET=(\S+)", env.read_text(errors="replace"), re.M)
        if m:
            used.append(ipaddress.ip_network(m.group(1) + ".0/24"))
    free = []
    for x in range(200, 255):
        net = ipaddress.ip_network(f"10.213.{x}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            free.append(f"10.213.{x}")
    if not free:
        raise BenchError("no free 10.213.X.0/24 subnet (X = 200..254) on this machine")
    return free


def cleanup_stale() -> None:
    """Tear down clusters of benches that died without their teardown (owner pid gone or recycled)."""
    for state in sorted(STATE_BASE.glob("dpb*")):
        try:
            pid, start = (state / "owner.pid").read_text().split()[:2]
        except (OSError, ValueError):
            pid = start = None
        if pid is None:  # no owner record yet: maybe coming up right now
            alive = time.time() - state.stat().st_mtime < 60
        else:
            try:
                alive = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == start
            except (OSError, IndexError):
                alive = False
        if not alive:
            log.get().info(f"removing the cluster {state.name} left by a dead bench")
            _run(["bash", str(SCRIPT), "down", "--prefix", state.name, "--state", str(state)], 120)
            shutil.rmtree(state, ignore_errors=True)


@atexit.register
def down_all() -> None:
    for c in list(_live):
        c.down()


def terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---- the CPU time of the ZeroMQ I/O threads (the wire's CURVE work) ------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def namespace_pids(paths: dict) -> dict:
    """{key: pids whose network namespace is the one bound at paths[key] (/run/netns/NAME)}: the same nsfs inode.
    The namespaces share this box's pid namespace, so /proc here sees their processes."""
    want = {}
    for key, path in paths.items():
        try:
            want[os.stat(path).st_ino] = key
        except OSError:
            pass
    out = {key: [] for key in paths}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                key = want.get(os.stat(f"/proc/{d}/ns/net").st_ino)
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if key is not None:
                out[key].append(int(d))
    return out


def thread_ticks(stat: str) -> tuple[str, int, int]:
    """(comm, utime, stime) from a /proc/PID/task/TID/stat line (comm is parenthesised and may hold spaces)."""
    head, _, rest = stat.rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), 1-based


def zmq_io_ticks(pids: list[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """{(pid, tid): (utime, stime)} of the ZMQbg/IO/n threads of these processes (threads gone meanwhile skipped)."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    comm, ut, st = thread_ticks(f.read())
            except (OSError, ValueError, IndexError):
                continue
            if comm.startswith("ZMQbg/IO"):
                out[(pid, int(tid))] = (ut, st)
    return out


def io_cpu_s(before: dict, after: dict, steps: int) -> dict[str, float]:
    """CPU-seconds per step of the I/O threads between two zmq_io_ticks samples: {"user", "sys"}. A thread seen
    only in `after` counts from 0 (it started meanwhile); one seen only in `before` is left out (it ended, and its
    last ticks went with it), so a sample never goes negative."""
    u = s = 0
    for key, (ut, st) in after.items():
        ub, sb = before.get(key, (0, 0))
        u, s = u + max(0, ut - ub), s + max(0, st - sb)
    return {"user": u / CLK_TCK / steps, "sys": s / CLK_TCK / steps}
