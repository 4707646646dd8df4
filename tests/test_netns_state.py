"""launch/netns-cluster.sh's state folder, against bash and the file system (no namespaces are made).

The script runs as root and sources STATE/cluster.env, so a folder prepared by someone else (in /tmp, the default)
would run their code as root. It must use only a folder it made itself (0700, ours, marked) and refuse any other
before reading anything in it: each case plants a cluster.env that would create a sentinel file when sourced, and
checks the one-line refusal and that the sentinel never appears. The control case (the script's own kind of folder)
shows that the same cluster.env is sourced there, so the test can tell refusing from never reading at all."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "netns-cluster.sh"
MARK = ".dptrain-netns-state"
ROOT = os.geteuid() == 0


def _plant(state: Path, sentinel: Path, mark: bool = True, mode: int = 0o700) -> None:
    state.mkdir(mode=0o700)
    (state / "cluster.env").write_text(f"touch {sentinel}\nPREFIX=dpz\nSUBNET=10.213.251\nN=0\nSLOTS=1\n"
                                       f"BRIDGE=dpz-br\nCOORDINATOR=10.213.251.1\n")
    if mark:
        (state / MARK).write_text("")
    os.chmod(state, mode)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def _refused(r: subprocess.CompletedProcess, state: Path, why: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith(f"netns-cluster.sh: error: state dir {state} {why}"), lines[0]
    assert "refusing to use it" in lines[0], lines[0]


@pytest.fixture
def base(tmp_path):
    os.chmod(tmp_path, 0o755)
    return tmp_path


def test_its_own_folder_is_read(base):
    sentinel, state = base / "sourced", base / "state"
    _plant(state, sentinel)
    r = _script("status", "--state", str(state))
    assert r.returncode == 0 and "cluster 'dpz': 0 host(s)" in r.stdout, r.stdout + r.stderr
    assert sentinel.exists()


@pytest.mark.parametrize("case, why", [
    ("no mark", "was not made by netns-cluster.sh"),
    ("mode 0755", "has mode 755, not 700"),
    ("symlink", "is a symbolic link"),
    ("a file", "is not a directory"),
    ("other owner", "is owned by uid 65534"),
    ("open parent", "is in "),
])
def test_a_folder_it_did_not_make_is_refused_before_anything_in_it_is_read(base, case, why):
    sentinel, state = base / "sourced", base / "state"
    if case == "no mark":
        _plant(state, sentinel, mark=False)
    elif case == "mode 0755":
        _plant(state, sentinel, mode=0o755)
    elif case == "symlink":
        _plant(base / "real", sentinel)
        state.symlink_to(base / "real")
    elif case == "a file":
        state.write_text(f"touch {sentinel}\n")
    elif case == "other owner":
        if not ROOT:
            pytest.skip("needs root to give the folder to another user")
        _plant(state, sentinel)
        os.chown(state, 65534, 65534)
    elif case == "open parent":  # anyone may rename the folder away and put theirs in its place
        parent = base / "open"
        parent.mkdir()
        os.chmod(parent, 0o777)
        state = parent / "state"
        _plant(state, sentinel)
        why = f"is in {parent}, writable by others (mode 777)"
    for args in (["status"], ["netem", "h1", "--clear"], ["down", "--prefix", "dpz"], ["up", "1", "--prefix", "dpz"]):
        if args[0] != "status" and not ROOT:
            continue  # the others need root first
        r = _script(*args, "--state", str(state))
        _refused(r, state, why)
        assert not sentinel.exists(), args
    assert state.is_symlink() or state.exists()  # refused, not removed or changed
    if case == "mode 0755":
        assert (state.stat().st_mode & 0o777) == 0o755


def test_sticky_world_writable_parent_like_tmp_is_accepted(base):
    parent = base / "tmp"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    sentinel, state = base / "sourced", parent / "state"
    _plant(state, sentinel)
    r = _script("status", "--state", str(state))
    assert r.returncode == 0 and sentinel.exists(), r.stderr


@pytest.mark.skipif(not ROOT, reason="up needs root")
def test_up_makes_its_folder_0700_and_marked(base):
    """`up` makes the folder before anything else that could fail for want of namespaces or sshd; whatever happens
    next (a full up, or a failure that tears down), the folder it made is its own: 0700, marked."""
    state = base / "new"
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    r = subprocess.run(["bash", str(SCRIPT), "up", "1", "--prefix", "dpzt", "--subnet", "10.213.252", "--state",
                        str(state)], capture_output=True, text=True, timeout=120)
    try:
        if "not found" in r.stderr:  # need_tools: no sshd here, nothing made
            pytest.skip(r.stderr.strip())
        st = os.lstat(state)
        assert (st.st_mode & 0o7777) == 0o700 and st.st_uid == 0 and (state / MARK).is_file(), r.stderr
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", "--prefix", "dpzt", "--state", str(state)],
                       capture_output=True, timeout=120)
