"""Test helper: a multi-host "cluster on one box" made of network namespaces.

Wraps ``launch/netns-cluster.sh`` for pytest.  Each host is a Linux network
namespace with its own address and a real OpenSSH server; the coordinator is
reached from the hosts on the bridge address in the root namespace.  Hosts share
this machine's filesystem, so the repo and datasets are at the same paths, but
an ssh session gets sshd's default PATH: run python as ``sys.executable``.

    from netns import cluster, require_netns

    def test_something():
        require_netns()                       # skip (or fail, see below) if unusable
        with cluster(2) as c:                 # always torn down, even on failure
            c.ssh("h1", "hostname -I")        # real ssh, BatchMode, generated key
            c.run("h2", ["ip", "-4", "addr"]) # ip netns exec, no ssh
            c.kill_host("h2")                 # link down + SIGKILL everything in it

Set ``DPTRAIN_REQUIRE_NETNS=1`` (CI does) to turn "namespaces unavailable"
into a test failure instead of a skip.  Needs root.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "netns-cluster.sh"
SSHD = "/usr/sbin/sshd"
# Per-session state dirs live under here: BASE/<prefix>/ (one cluster each).
BASE = Path(os.environ.get("DPTRAIN_NETNS_TEST_DIR", "/tmp/dptrain-netns-test"))
# Test clusters use 10.213.X.0/24, X from 100 upward (the CLI default is 10.213.0).
SUBNET_FIRST, SUBNET_SECOND, SUBNET_START = 10, 213, 100

Cmd = str | Sequence[str]

__all__ = [
    "NetnsCluster",
    "cluster",
    "netns_available",
    "require_netns",
    "cleanup_stale",
    "SCRIPT",
]

_available: tuple[bool, str] | None = None


def _sh(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def netns_available() -> tuple[bool, str]:
    """(True, "") when this machine can run a netns cluster, else (False, why).

    Checks root, the tools (ip, sshd, ssh, ssh-keygen, bash) and that a
    throwaway namespace and bridge can really be created and deleted.
    """
    global _available
    if _available is not None:
        return _available

    def check() -> tuple[bool, str]:
        if os.name != "posix" or not Path("/proc/self/ns/net").exists():
            return False, "not Linux (no network namespaces)"
        if os.geteuid() != 0:
            return False, "needs root (ip netns / veth / bridge need CAP_NET_ADMIN)"
        for tool in ("ip", "ssh", "ssh-keygen", "bash"):
            if shutil.which(tool) is None:
                return False, f"'{tool}' not installed (run .ci/install-system.sh)"
        if not os.access(SSHD, os.X_OK):
            return False, f"{SSHD} not installed (openssh-server; run .ci/install-system.sh)"
        if not SCRIPT.is_file():
            return False, f"{SCRIPT} missing"
        probe = f"dptprobe{os.getpid()}"
        r = _sh(["ip", "netns", "add", probe])
        if r.returncode != 0:
            return False, f"'ip netns add' not permitted here: {r.stderr.strip()}"
        r2 = _sh(["ip", "link", "add", f"{probe}b", "type", "bridge"])
        _sh(["ip", "link", "del", f"{probe}b"])
        r3 = _sh(["ip", "netns", "del", probe])
        if r2.returncode != 0:
            return False, f"cannot create a bridge: {r2.stderr.strip()}"
        if r3.returncode != 0:
            return False, f"'ip netns del' failed: {r3.stderr.strip()}"
        return True, ""

    _available = check()
    return _available


def require_netns() -> None:
    """pytest.skip (or pytest.fail with DPTRAIN_REQUIRE_NETNS=1) when unavailable."""
    import pytest

    ok, why = netns_available()
    if not ok:
        if os.environ.get("DPTRAIN_REQUIRE_NETNS") == "1":
            pytest.fail(f"netns cluster required (DPTRAIN_REQUIRE_NETNS=1) but unavailable: {why}")
        pytest.skip(f"netns cluster unavailable: {why}")


# ----------------------------------------------------------------- stale sessions
def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the comm field (2) may contain spaces, so split after ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(state: Path) -> bool:
    try:
        pid_s, start = (state / "owner.pid").read_text().split()[:2]
        pid = int(pid_s)
    except (OSError, ValueError):
        # No owner record: treat as dead only if the dir is older than a minute
        # (an `up` might be writing it right now).
        try:
            return time.time() - state.stat().st_mtime < 60
        except OSError:
            return False
    now = _proc_start_time(pid)
    return now is not None and (start == "0" or now == start)


def cleanup_stale() -> list[str]:
    """Tear down clusters left by dead test sessions; returns their prefixes.

    Only state dirs under BASE whose owner process is gone are touched, so a
    parallel live session (or a user's CLI cluster) is never affected.
    """
    cleaned: list[str] = []
    if not BASE.is_dir():
        return cleaned
    for state in sorted(BASE.iterdir()):
        if not state.is_dir() or not state.name.startswith("dpt") or _owner_alive(state):
            continue
        _sh(["bash", str(SCRIPT), "down", "--prefix", state.name, "--state", str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        cleaned.append(state.name)
    return cleaned


# ----------------------------------------------------------------- the cluster
def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


_counter = 0
_live: set[NetnsCluster] = set()


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Networks of this machine's IPv4 addresses and routes, plus the subnets of
    other test clusters (they may be coming up right now)."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _sh(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in _sh(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        dst = line.split()[0] if line.split() else ""
        if dst in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            dst = line.split()[1] if dst != "default" else ""
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.prefixlen > 0:
            nets.append(net)
    if BASE.is_dir():
        for env in BASE.glob("*/cluster.env"):
            for kv in env.read_text(errors="replace").splitlines():
                if kv.startswith("SUBNET="):
                    nets.append(ipaddress.ip_network(kv.split("=", 1)[1].strip() + ".0/24"))
    return nets


def _pick_subnet() -> str:
    used = _networks_in_use()
    for k in range(256):
        cand = f"{SUBNET_FIRST}.{SUBNET_SECOND}.{(SUBNET_START + k) % 256}"
        net = ipaddress.ip_network(cand + ".0/24")
        if not any(net.overlaps(u) for u in used):
            return cand
    raise RuntimeError(f"no free {SUBNET_FIRST}.{SUBNET_SECOND}.X.0/24 subnet on this machine")


class NetnsCluster:
    """N namespace hosts with sshd each; use as a context manager (``cluster(n)``).

    Attributes after ``up()``/``__enter__``:
      hosts            ["h1", "h2", ...]        ssh aliases (as in the hostfile)
      namespaces       {"h1": "dptXXXX-h1", ...}
      addresses        {"h1": "10.213.X.11", ...}
      coordinator_addr "10.213.X.1" (the bridge, in the root namespace)
      state_dir, ssh_config, identity, known_hosts, hostfile, hostfile_ip: Path
    """

    def __init__(self, n_hosts: int = 2, *, slots: int = 2, prefix: str | None = None,
                 script: Path = SCRIPT, up_timeout: float = 60):
        global _counter
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be 1..200")
        if prefix is None:
            prefix = f"dpt{_base36(os.getpid())}{_base36(_counter % 36)}"
            _counter += 1
        self.n_hosts = n_hosts
        self.slots = slots
        self.prefix = prefix
        self.script = Path(script)
        self.up_timeout = up_timeout
        self.state_dir = BASE / prefix
        self.ssh_config = self.state_dir / "ssh_config"
        self.identity = self.state_dir / "id_ed25519"
        self.known_hosts = self.state_dir / "known_hosts"
        self.hostfile = self.state_dir / "hostfile"
        self.hostfile_ip = self.state_dir / "hostfile.ip"
        self.hosts = [f"h{i}" for i in range(1, n_hosts + 1)]
        self.namespaces = {h: f"{prefix}-{h}" for h in self.hosts}
        self.subnet: str | None = None
        self.addresses: dict[str, str] = {}
        self.coordinator_addr: str | None = None
        self.up_output = ""
        self._is_up = False

    # -- lifecycle
    def up(self) -> NetnsCluster:
        ok, why = netns_available()
        if not ok:
            raise RuntimeError(f"netns cluster unavailable: {why}")
        cleanup_stale()
        BASE.mkdir(parents=True, exist_ok=True)
        os.chmod(BASE, 0o700)
        _live.add(self)
        # Pick a free 10.213.X.0/24 under a lock so parallel sessions do not race.
        with open(BASE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cand = _pick_subnet()
            r = _sh(["bash", str(self.script), "up", str(self.n_hosts), "--prefix", self.prefix,
                     "--subnet", cand, "--slots", str(self.slots), "--state", str(self.state_dir),
                     "--owner-pid", str(os.getpid())], timeout=self.up_timeout)
        self.up_output = r.stdout + r.stderr
        if r.returncode != 0:
            self.down()
            raise RuntimeError(f"netns-cluster.sh up failed (rc {r.returncode}):\n{self.up_output}")
        self._is_up = True
        self.subnet = cand
        self.coordinator_addr = f"{cand}.1"
        self.addresses = {h: f"{cand}.{10 + i}" for i, h in enumerate(self.hosts, start=1)}
        return self

    def down(self) -> None:
        """Tear everything down (idempotent; also after a partial up)."""
        try:
            r = _sh(["bash", str(self.script), "down", "--prefix", self.prefix,
                     "--state", str(self.state_dir)], timeout=60)
            if r.returncode != 0:
                print(f"[netns] down failed (rc {r.returncode}): {r.stdout}{r.stderr}")
        finally:
            self._is_up = False
            _live.discard(self)
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()

    # -- lookups
    def namespace(self, host: str) -> str:
        if host in self.namespaces:
            return self.namespaces[host]
        if host in self.namespaces.values():
            return host
        for h, a in self.addresses.items():
            if a == host:
                return self.namespaces[h]
        raise KeyError(f"no host {host!r} in cluster {self.prefix} ({', '.join(self.hosts)})")

    def _alias(self, host: str) -> str:
        ns = self.namespace(host)
        return next(h for h, n in self.namespaces.items() if n == ns)

    def veth(self, host: str) -> str:
        """Root-namespace side of the host's veth pair."""
        return f"{self.prefix}-v{self._alias(host)[1:]}"

    # -- commands
    def run(self, host: str, cmd: Cmd, timeout: float = 30, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run cmd inside the host's namespace (``ip netns exec``; no ssh).

        A str runs under ``bash -c``; a list is an argv.  Text output captured.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.namespace(host), *argv],
                              timeout=timeout, check=check, **kw)

    def ssh_argv(self, host: str | None = None, *extra_opts: str) -> list[str]:
        """The ssh command prefix a launcher would use: ssh -F CONFIG [opts] [host]."""
        argv = ["ssh", "-F", str(self.ssh_config), *extra_opts]
        return argv + [self._alias(host)] if host is not None else argv

    def ssh(self, host: str, cmd: Cmd, timeout: float = 30, check: bool = False,
            extra_opts: Sequence[str] = (), **kw) -> subprocess.CompletedProcess:
        """Run cmd on host over real ssh (BatchMode, cluster key, known_hosts).

        A list is shell-quoted; a str is passed to the remote shell as is.
        """
        remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*self.ssh_argv(host, *extra_opts), "--", remote],
                              timeout=timeout, check=check, **kw)

    def pids(self, host: str) -> list[int]:
        r = _sh(["ip", "netns", "pids", self.namespace(host)])
        return [int(p) for p in r.stdout.split()]

    def kill_host(self, host: str) -> None:
        """Simulate losing a machine: its link goes down first (peers see silence,
        no FIN/RST), then every process in its namespace (sshd included) is SIGKILLed."""
        ns = self.namespace(host)
        _sh(["ip", "link", "set", self.veth(host), "down"])
        _sh(["ip", "-n", ns, "link", "set", "eth0", "down"])
        deadline = time.monotonic() + 5
        while (pids := self.pids(host)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        if self.pids(host):
            raise RuntimeError(f"processes survive in {ns}: {self.pids(host)}")

    def netem(self, host: str, *, rate: str | None = None, delay: str | None = None,
              loss: str | None = None, clear: bool = False) -> subprocess.CompletedProcess:
        """Shape the host's link both ways (``netem HOST --rate ...`` / ``--clear``).
        ``host`` may be "all".  Raises CalledProcessError with the script's message."""
        argv = ["bash", str(self.script), "netem", host if host == "all" else self._alias(host),
                "--state", str(self.state_dir)]
        if clear:
            argv.append("--clear")
        for opt, val in (("--rate", rate), ("--delay", delay), ("--loss", loss)):
            if val is not None:
                argv += [opt, val]
        r = _sh(argv)
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def status(self) -> str:
        r = _sh(["bash", str(self.script), "status", "--state", str(self.state_dir)])
        return r.stdout + r.stderr

    def __repr__(self) -> str:
        return (f"NetnsCluster(prefix={self.prefix!r}, hosts={self.addresses or self.hosts}, "
                f"coordinator={self.coordinator_addr!r}, up={self._is_up})")


def cluster(n_hosts: int = 2, **kw) -> NetnsCluster:
    """Context manager: ``with cluster(2) as c: ...`` — up on enter, down on exit."""
    return NetnsCluster(n_hosts, **kw)


@atexit.register
def _down_all() -> None:
    # Last resort when a cluster's __exit__ never ran (e.g. KeyboardInterrupt mid-up).
    for c in list(_live):
        c.down()
