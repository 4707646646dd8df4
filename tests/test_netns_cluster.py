"""Tests of the multi-host test infrastructure itself (launch/netns-cluster.sh + tests/netns.py).

Skipped when namespaces are unusable (not root, no sshd, ...), unless
DPTRAIN_REQUIRE_NETNS=1, which makes that a failure (CI sets it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    from netns import BASE, SCRIPT, NetnsCluster, _pick_subnet, cleanup_stale, cluster, require_netns
except ImportError:  # tests/ imported as a package
    from tests.netns import BASE, SCRIPT, NetnsCluster, _pick_subnet, cleanup_stale, cluster, require_netns


@pytest.fixture(scope="module")
def shared():
    """One 2-host cluster for the non-destructive tests."""
    require_netns()
    with cluster(2) as c:
        yield c


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _leftovers(prefix: str, state: Path) -> list[str]:
    found = []
    ns = [l.split()[0] for l in _ip("netns", "list").splitlines() if l.strip()]
    found += [f"netns {n}" for n in ns if n.startswith(prefix + "-")]
    links = [l.split()[0].split("@")[0] for l in _ip("-br", "link").splitlines() if l.strip()]
    found += [f"link {l}" for l in links if l.startswith(prefix + "-")]
    r = subprocess.run(["pgrep", "-af", str(state) + "/"], capture_output=True, text=True)
    found += [f"process {l}" for l in r.stdout.splitlines()]
    return found


@pytest.mark.timeout(30)
def test_ssh_into_each_host_shows_its_namespace_address(shared: NetnsCluster):
    assert shared.hosts == ["h1", "h2"]
    assert len(set(shared.addresses.values())) == 2
    assert shared.coordinator_addr.endswith(".1")
    assert shared.hostfile.read_text().splitlines() == ["h1 slots=2", "h2 slots=2"]
    for host, addr in shared.addresses.items():
        r = shared.ssh(host, "hostname -I; ip -4 -o addr show dev eth0", timeout=15)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == addr  # the namespace sees only its own address
        assert f"inet {addr}/24" in r.stdout
        # same sshd also reachable by plain address (known_hosts lists both)
        r = shared.ssh(addr, "true", timeout=15)
        assert r.returncode == 0, r.stderr
        # ip netns exec path agrees
        assert shared.run(host, ["hostname", "-I"]).stdout.split() == [addr]


@pytest.mark.timeout(30)
def test_ssh_runs_callers_python_by_absolute_path_on_shared_fs(shared: NetnsCluster):
    code = f"import sys, os; print(sys.executable); print(os.path.isfile({__file__!r}))"
    r = shared.ssh("h1", [sys.executable, "-c", code], timeout=15)
    assert r.returncode == 0, r.stderr
    exe, visible = r.stdout.split()
    assert exe == sys.executable and visible == "True"


@pytest.mark.timeout(30)
def test_hosts_reach_coordinator_and_each_other_but_nothing_outside(shared: NetnsCluster):
    srv = socket.create_server((shared.coordinator_addr, 0))
    port = srv.getsockname()[1]
    peers = []

    def echo():
        for _ in shared.hosts:
            conn, peer = srv.accept()
            with conn:
                peers.append(peer[0])
                conn.sendall(conn.recv(1024).upper())

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    client = (
        "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5);"
        "s.sendall(b'ping'); print(s.recv(1024).decode())"
    )
    for host in shared.hosts:
        r = shared.ssh(host, [sys.executable, "-c", client, shared.coordinator_addr, str(port)], timeout=15)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "PING"
    t.join(5)
    srv.close()
    assert sorted(peers) == sorted(shared.addresses.values())  # came from the namespace addresses

    # host-to-host over the bridge
    r = shared.run("h1", f"exec 3<>/dev/tcp/{shared.addresses['h2']}/22 && head -c 7 <&3", timeout=10)
    assert r.returncode == 0 and r.stdout == "SSH-2.0", r
    # no route out: the kernel refuses before any packet is sent
    for outside in ("192.0.2.1", "1.1.1.1", "8.8.8.8"):
        r = shared.run("h1", ["ip", "route", "get", outside], timeout=10)
        assert r.returncode != 0 and "unreachable" in r.stderr.lower(), r


@pytest.mark.timeout(30)
def test_wrong_key_fails_fast_without_prompt(shared: NetnsCluster, tmp_path: Path):
    key = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    argv = [
        "ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={shared.known_hosts}",
        "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
        f"root@{shared.addresses['h1']}", "true",
    ]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=15)
    elapsed = time.monotonic() - t0
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr
    assert elapsed < 5, elapsed
    # and an unknown host key is refused too (no "are you sure" prompt in BatchMode)
    r = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(shared.identity), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={tmp_path / 'empty_known_hosts'}", "-o", "StrictHostKeyChecking=yes",
         f"root@{shared.addresses['h1']}", "true"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=15)
    assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr


@pytest.mark.timeout(30)
def test_netem_rate_limits_the_host_link(shared: NetnsCluster):
    payload = 2_500_000  # bytes; 20 Mbit at 20 Mbit/s ~ 1 s, unshaped ~ milliseconds

    def send_seconds() -> float:
        srv = socket.create_server((shared.coordinator_addr, 0))
        port = srv.getsockname()[1]
        got = []

        def sink():
            conn, _ = srv.accept()
            t0, n = time.monotonic(), 0
            while data := conn.recv(1 << 16):
                n += len(data)
            got.append((n, time.monotonic() - t0))
            conn.close()

        t = threading.Thread(target=sink, daemon=True)
        t.start()
        code = (f"import socket; s=socket.create_connection(({shared.coordinator_addr!r}, {port}));"
                f"s.sendall(b'x'*{payload}); s.close()")
        shared.run("h1", [sys.executable, "-c", code], timeout=20, check=True)
        t.join(20)
        srv.close()
        assert got and got[0][0] == payload
        return got[0][1]

    shared.netem("h1", rate="20mbit")
    try:
        assert "tbf" in subprocess.run(["tc", "qdisc", "show", "dev", shared.veth("h1")],
                                       capture_output=True, text=True).stdout
        shaped = send_seconds()
    finally:
        shared.netem("h1", clear=True)
    unshaped = send_seconds()
    assert 0.7 < shaped < 3.0, shaped
    assert unshaped < 0.5, unshaped
    # --delay needs sch_netem; where the kernel lacks it the error must say so
    try:
        shared.netem("h2", delay="1ms")
    except subprocess.CalledProcessError as e:
        assert "sch_netem" in e.stderr
    finally:
        shared.netem("h2", clear=True)


@pytest.mark.timeout(40)
def test_kill_host_makes_it_unreachable():
    require_netns()
    with cluster(2) as c:
        # something running on h2, started the way a launcher would
        r = c.ssh("h2", "nohup sleep 600 >/dev/null 2>&1 & echo $!", timeout=15)
        assert r.returncode == 0, r.stderr
        sleeper = int(r.stdout.strip())
        assert sleeper in c.pids("h2")

        c.kill_host("h2")

        assert c.pids("h2") == []
        assert not Path(f"/proc/{sleeper}").exists() or "Z" in Path(f"/proc/{sleeper}/stat").read_text().split()[2]
        t0 = time.monotonic()
        r = c.ssh("h2", "true", timeout=15, extra_opts=["-o", "ConnectTimeout=2"])
        assert r.returncode == 255 and time.monotonic() - t0 < 5, r
        with pytest.raises(OSError):
            socket.create_connection((c.addresses["h2"], 22), timeout=1).close()
        # the other host is unaffected
        r = c.ssh("h1", "true", timeout=15)
        assert r.returncode == 0, r.stderr


@pytest.mark.timeout(40)
def test_down_leaves_nothing_and_is_idempotent():
    require_netns()
    c = cluster(2)
    with c:
        prefix, state = c.prefix, c.state_dir
        r = c.ssh("h1", "nohup sleep 600 >/dev/null 2>&1 & echo $!", timeout=15)
        sleeper = int(r.stdout.strip())
        assert _leftovers(prefix, state)  # namespaces, veths, bridge, sshds exist
    assert _leftovers(prefix, state) == []
    assert not Path(f"/proc/{sleeper}/cmdline").exists() or Path(f"/proc/{sleeper}/cmdline").read_bytes() == b""
    # second down (and down of a cluster never brought up) are harmless
    c.down()
    r = subprocess.run(["bash", str(SCRIPT), "down", "--prefix", prefix, "--state", str(state)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert _leftovers(prefix, state) == []


@pytest.mark.timeout(40)
def test_failed_up_cleans_up_after_itself(tmp_path: Path):
    require_netns()
    prefix = f"dptf{os.getpid() % 100000}"
    state = tmp_path / "state"
    env = dict(os.environ, SSHD="/bin/false")  # sshd "starts" and fails after the links exist
    r = subprocess.run(["bash", str(SCRIPT), "up", "2", "--prefix", prefix, "--subnet", _pick_subnet(),
                        "--state", str(state)], capture_output=True, text=True, env=env, timeout=30)
    try:
        assert r.returncode != 0
        assert "cleaning up" in r.stderr
        assert _leftovers(prefix, state) == []
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", "--prefix", prefix, "--state", str(state)],
                       capture_output=True, timeout=30)


@pytest.mark.timeout(40)
def test_stale_cluster_of_dead_session_is_cleaned_but_live_one_kept():
    require_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = NetnsCluster(1)
    r = subprocess.run(["bash", str(SCRIPT), "up", "1", "--prefix", stale.prefix, "--subnet", _pick_subnet(),
                        "--state", str(stale.state_dir), "--owner-pid", str(dead.pid)],
                       capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        with cluster(1) as live:  # up() runs cleanup_stale() first
            assert _leftovers(stale.prefix, stale.state_dir) == []
            assert not stale.state_dir.exists()
            # a live cluster (owner pid alive) is never touched; a parallel session's
            # dead-owner leftovers may legitimately be cleaned here
            assert live.prefix not in cleanup_stale()
            assert live.state_dir.is_dir()
            assert live.ssh("h1", "true", timeout=15).returncode == 0
    finally:
        stale.down()
    assert not (BASE / stale.prefix).exists()
