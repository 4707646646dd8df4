"""dptrain.distributed.hostfile: parsed hosts and rank tables compare against hand-written expectations taken from
the OpenMPI/Horovod/DeepSpeed hostfile and filter documentation; each error must name its file and line."""
import pytest

from dptrain.distributed.hostfile import (
    HostfileError,
    HostSlots,
    RankEntry,
    assign_ranks,
    filter_hosts,
    parse_filter,
    parse_hostfile,
    parse_hostfile_text,
    parse_hosts,
)

HOSTFILE = """\
# cluster for the LFW run
node-a slots=4        # trailing comment

alice@node-b slots=2
node-c
   node-d:2
node-e slots = 3
"""


def test_parse_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(HOSTFILE)
    hosts = parse_hostfile(path)
    assert hosts == [HostSlots("node-a", 4), HostSlots("alice@node-b", 2), HostSlots("node-c", 1),
                     HostSlots("node-d", 2), HostSlots("node-e", 3)]
    assert hosts[1].hostname == "node-b" and hosts[0].slot_ids == (0, 1, 2, 3)


def test_assign_ranks_packs_each_host_first():
    table = assign_ranks(parse_hosts("a:2,b,c:3"))
    assert table == [(0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "c", 0), (4, "c", 1), (5, "c", 2)]
    assert isinstance(table[0], RankEntry) and table[3].host == "c"


@pytest.mark.parametrize("text, match", [
    ("a slots=2\nb\na slots=1\n", r"hosts:3: duplicate host 'a' \(first at hosts:1\)"),
    ("a\nbob@a\n", r"hosts:2: duplicate host 'a'"),
    ("a slots=x\n", r"hosts:1: slot count"),
    ("a slots=0\n", r"hosts:1: slot count"),
    ("a slots=-1\n", r"hosts:1: slot count"),
    ("a max_slots=4\n", r"hosts:1: unknown option 'max_slots=4'"),
    ("a slots 4\n", r"hosts:1: expected 'host slots=N', got 'a slots 4'"),
    ("a slots=2 extra\n", r"hosts:1: expected 'host slots=N'"),
    ("a:2 slots=2\n", r"hosts:1: use either"),
    ("\n\nbad_host! slots=2\n", r"hosts:3: bad host name"),
    ("a:22:1\n", r"hosts:1:"),
    ("# nothing\n\n", r"hosts: no hosts"),
])
def test_hostfile_errors_name_file_and_line(text, match):
    with pytest.raises(HostfileError, match=match):
        parse_hostfile_text(text, "hosts")


def test_unreadable_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="cannot read"):
        parse_hostfile(tmp_path / "missing")


def test_parse_hosts():
    assert parse_hosts("a:4,b:4") == [HostSlots("a", 4), HostSlots("b", 4)]
    assert parse_hosts(" a , bob@b:2") == [HostSlots("a", 1), HostSlots("bob@b", 2)]
    for bad, match in [("a:4,a:2", "duplicate"), ("a,,b", "empty host"), ("a:0", "slot count"), ("", "empty")]:
        with pytest.raises(HostfileError, match=match):
            parse_hosts(bad)


def test_parse_filter():
    assert parse_filter("a:0,2@b") == {"a": (0, 2), "b": None}
    for bad in ["a:x", "a:0,0", "a@a", "a:", "a:-1", "@b"]:
        with pytest.raises(HostfileError):
            parse_filter(bad)


def test_include_and_exclude_deepspeed_style():
    hosts = parse_hosts("a:4,b:2,c:1")
    assert filter_hosts(hosts) == hosts
    assert filter_hosts(hosts, include="c@a:0,2") == [HostSlots("a", 2, (0, 2)), HostSlots("c", 1)]
    assert filter_hosts(hosts, include="b") == [HostSlots("b", 2)]
    assert filter_hosts(hosts, exclude="a:3@c") == [HostSlots("a", 3, (0, 1, 2)), HostSlots("b", 2)]
    # ranks count the surviving slots; local_rank is the position, slot_ids keep the original slot
    assert assign_ranks(filter_hosts(hosts, include="a:1,3")) == [(0, "a", 0), (1, "a", 1)]


def test_filters_compare_bare_host_names():
    hosts = parse_hosts("alice@a:2,b")
    assert filter_hosts(hosts, exclude="a:0") == [HostSlots("alice@a", 1, (1,)), HostSlots("b", 1)]


@pytest.mark.parametrize("kw, match", [
    (dict(include="a", exclude="b"), "mutually exclusive"),
    (dict(include="z"), "'z', which is not in the host list"),
    (dict(include="a:7"), r"slots \[7\] of 'a'"),
    (dict(exclude="a@b"), "leaves no slots"),
])
def test_filter_errors(kw, match):
    with pytest.raises(HostfileError, match=match):
        filter_hosts(parse_hosts("a:2,b"), **kw)


def test_filter_of_filter_keeps_original_slot_ids():
    once = filter_hosts(parse_hosts("a:4"), exclude="a:0")
    assert filter_hosts(once, exclude="a:2") == [HostSlots("a", 2, (1, 3))]
    with pytest.raises(HostfileError, match=r"slots \[0\]"):
        filter_hosts(once, include="a:0")


def test_environment_forwarded_to_the_hosts(tmp_path, monkeypatch):
    """OMP_* / OPENBLAS_* / MKL_* / NPY_* set here (threads, kernel choices), ./.dptrain_env, then -x NAME[=VALUE]
    (later wins); quoted for ssh."""
    import shlex

    import pytest

    from dptrain.launcher.hosts import forwarded_env, remote_command
    env_file = tmp_path / ".dptrain_env"
    env_file.write_text("# site settings\nDATA_ROOT=/shared data\nOMP_PROC_BIND=close\n")
    environ = {"OMP_NUM_THREADS": "4", "MKL_DEBUG_CPU_TYPE": "5", "HOME": "/root", "WANDB_KEY": "k", "PATH": "/bin",
               "OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL"}
    got = forwarded_env(["WANDB_KEY", "MODE=fast", "OMP_PROC_BIND=spread"], environ, env_file)
    assert got == {"OMP_NUM_THREADS": "4", "MKL_DEBUG_CPU_TYPE": "5", "DATA_ROOT": "/shared data",
                   "OMP_PROC_BIND": "spread", "WANDB_KEY": "k", "MODE": "fast", "OPENBLAS_CORETYPE": "Haswell",
                   "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL"}
    line = remote_command(["/usr/bin/python3", "-m", "dptrain", "agent"], got)
    words = shlex.split(line)
    assert words[words.index("exec") + 1] == "/bin/sh" and not any("DATA_ROOT" in w or "fast" in w for w in words)
    assert words[-4:] == ["/usr/bin/python3", "-m", "dptrain", "agent"]
    with pytest.raises(SystemExit, match="-x NOPE: not set"):
        forwarded_env(["NOPE"], environ, env_file)
    with pytest.raises(SystemExit, match="not an environment variable name"):
        forwarded_env(["1BAD=x"], environ, env_file)
    env_file.write_text("no equals sign\n")
    with pytest.raises(SystemExit, match=r"\.dptrain_env:1: expected NAME=VALUE"):
        forwarded_env([], environ, env_file)
    assert remote_command(["x"], {}).endswith("exec x")


def test_forwarded_values_travel_on_stdin_never_in_the_ssh_command_line(tmp_path):
    """-x NAME=VALUE: ssh's argv (which `ps` shows every local user, here and on the host, for the whole run) has
    no value; the remote shell line, run for real by /bin/sh with what the launcher writes down ssh's stdin, exports
    them as they are (nothing evaluated) before the agent's interpreter starts (PYTHONPATH counts), and leaves the
    next line (the keys) for the agent."""
    import argparse
    import json
    import subprocess
    import sys

    from dptrain.launcher.hosts import agent_argv, env_lines, remote_command, ssh_argv
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "probe_mod.py").write_text("SEEN = 'imported'\n")
    pwned = tmp_path / "pwned"
    env = {"WANDB_API_KEY": f"s3cr3t $(touch {pwned}) `touch {pwned}` ' \" \\ ;", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(tmp_path / "mods"), "EMPTY": ""}
    names = sorted(env)
    probe = [sys.executable, "-c", "import json, os, sys, probe_mod; print(json.dumps({'env': {k: os.environ.get(k) "
             f"for k in {names!r}}}, 'mod': probe_mod.SEEN, 'next': sys.stdin.readline()}}))"]
    line = remote_command(probe, env)
    keys = b'{"server_public": "..."}\n'
    r = subprocess.run(["/bin/sh", "-c", line], input=env_lines(env) + keys, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"env": env, "mod": "imported", "next": keys.decode()}
    assert not pwned.exists()
    ssh = ssh_argv(argparse.Namespace(ssh_config=None, ssh_port=None, ssh_identity=None), HostSlots("h", 2))
    argv = ssh + [remote_command(agent_argv("/usr/bin/python3", "tcp://10.0.0.1:5", "run", 0, HostSlots("h", 2),
                                            "-"), env)]
    assert not any("s3cr3t" in a or "OMP_NUM_THREADS" in a or str(tmp_path) in a for a in argv), argv
    assert remote_command(["x"], {}).endswith("exec x") and env_lines({}) == b""
    from dptrain.launcher.hosts import forwarded_env
    with pytest.raises(SystemExit, match="MULTI: a value with a newline"):
        forwarded_env(["MULTI=a\nb"], {}, tmp_path / "none")
