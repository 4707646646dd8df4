"""`dptrain launch --hostfile FILE` / `-H a:2,b:2`: one agent per host, over ssh or started by the hosts themselves.

    dptrain launch --hostfile hosts --bind 10.0.0.1 --data /data/lfw.tgz --config configs/lfw.toml
    dptrain launch -H a:2,b:2 --bind 10.0.0.1 --ssh-identity ~/.ssh/id_ed25519 --ssh-port 2222 ...
    dptrain launch -H a:2,b:2 --bind 10.0.0.1 --port 29500 --no-ssh ...   # then on each host, `dptrain agent ...`

The coordinator runs here, listening on --bind (an address every host can reach; 127.0.0.1 only works when every
host is this machine). Every agent connects back with ZeroMQ CURVE: the run's keys are generated here and handed
to agents over the ssh channel's stdin (or, with --no-ssh, written to RUN/agent-keys.json, mode 0600, which each
host must be able to read: a shared filesystem or a copy). The environment forwarded with -x goes down the same stdin
first: its values are never on a command line, which `ps` shows every local user. ssh runs with BatchMode (never a password prompt) and
`python -m dptrain agent` with this interpreter's absolute path (override with --remote-python): hosts need the
same install at the same path, which preflight checks (versions and code hash in HELLO; the dataset on each host).

An ssh that fails (refused, unknown host key, no key) is reported in one line per host with ssh's own words.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .. import config as config_mod, log
from ..config import Config
from ..distributed import hostfile
from ..distributed.coordinator import Coordinator, WorkerFailure
from ..distributed.curve import RunKeys, write_launch_failure
from ..distributed.datapaths import HostBuffers
from ..distributed.hostfile import HostfileError, HostSlots, assign_ranks, filter_hosts, parse_hostfile, parse_hosts
from ..distributed.peers import PeerState
from ..distributed.session import Session, frame_limit
from ..train import prepare_or_exit
from .options import LaunchOptions
from .run import run_session

SSH_REPORT_GRACE_S = 8.0  # after one host's ssh fails, how long the others get to fail (or not) for the report
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=2",
               "-o", "ServerAliveCountMax=3"]


def resolve_hosts(args: LaunchOptions) -> list[HostSlots]:
    if args.hostfile and args.hosts:
        raise SystemExit("dptrain launch: give --hostfile or -H, not both")
    if not (args.hostfile or args.hosts):
        raise SystemExit("dptrain launch --no-ssh needs the hosts (--hostfile or -H)")
    try:
        hosts = parse_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts)
        hosts = filter_hosts(hosts, include=args.include, exclude=args.exclude)
    except HostfileError as e:  # it names the file and line
        raise SystemExit(f"dptrain launch: {e}") from None
    if not hosts:
        raise SystemExit("dptrain launch: no host left after --include/--exclude")
    source = f"--hostfile {args.hostfile}" if args.hostfile else f"-H {args.hosts}"
    total = args.np
    if total is not None:  # mpirun's and horovodrun's -np: the total, filled host by host
        try:
            hosts = hostfile.first_slots(hosts, total, source)
        except HostfileError as e:
            raise SystemExit(f"dptrain launch: {e}") from None
    per_host = args.workers
    if per_host is not None and any(h.slots != per_host for h in hosts):  # torchrun's per-node count
        raise SystemExit(f"dptrain launch: --workers/--nproc-per-node {per_host} is per host, but {source} gives "
                         f"{', '.join(f'{h.hostname}:{h.slots}' for h in hosts)}: set the slots there, or -np N for "
                         f"a total")
    return hosts


def agent_argv(python: str, endpoint: str, run_id: str, index: int, host: HostSlots, keys: str) -> list[str]:
    argv = [python, "-m", "dptrain", "agent", "--connect", endpoint, "--run", run_id, "--host-index", str(index),
            "--slots", str(host.slots), "--host-label", host.hostname]
    return argv + (["--keys-stdin"] if keys == "-" else ["--keys", keys])


# threading knobs and kernel choices (OPENBLAS_CORETYPE, NPY_DISABLE_CPU_FEATURES) set here are meant for the hosts too
FORWARD_PREFIXES = ("OMP_", "OPENBLAS_", "MKL_", "NPY_")
ENV_FILE = ".dptrain_env"


def forwarded_env(names: list[str] | None, environ: dict | None = None, env_file: Path | None = None) -> dict:
    """What the agents' environment gets from the launcher: OMP_* / OPENBLAS_* / MKL_* / NPY_* set here, the lines of
    ./.dptrain_env (NAME=VALUE, # comments), then each `-x NAME[=VALUE]` (mpirun's spelling: NAME alone takes
    this environment's value). Later ones win. A bad name or a `-x NAME` that is not set is an error naming it."""
    environ = os.environ if environ is None else environ
    out = {k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)}
    path = Path(ENV_FILE) if env_file is None else env_file
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, eq, value = line.partition("=")
            if not eq or not _env_name(name.strip()):
                raise SystemExit(f"{path}:{n}: expected NAME=VALUE, got {line!r}")
            out[name.strip()] = value.strip()
    for item in names or []:
        name, eq, value = item.partition("=")
        if not _env_name(name):
            raise SystemExit(f"-x {item!r}: not an environment variable name")
        if not eq:
            if name not in environ:
                raise SystemExit(f"-x {name}: not set in this environment (use -x {name}=VALUE)")
            value = environ[name]
        out[name] = value
    for name, value in out.items():
        if "\n" in value or "\0" in value:  # they travel as lines (env_lines)
            raise SystemExit(f"{name}: a value with a newline or NUL cannot be forwarded to the hosts")
    return out


def _env_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))


# Reads NAME=VALUE lines from stdin up to an empty one, exports each (`export "$kv"` assigns the text as it is: nothing
# in it is evaluated), then runs the agent, whose stdin goes on with the keys. The values never appear in an argv.
READ_ENV = 'while IFS= read -r kv && [ -n "$kv" ]; do export "$kv"; done; exec "$@"'


def remote_command(argv: list[str], env: dict) -> str:
    """The shell line ssh runs on a host: the launcher's working directory, then the agent, under a /bin/sh that
    first reads the forwarded environment's names and values from stdin (`env_lines`: ssh's channel, never the
    command line, which every local user can read with `ps` on both ends for the whole run)."""
    run = shlex.join(["/bin/sh", "-c", READ_ENV, "sh", *argv]) if env else shlex.join(argv)
    return "cd " + shlex.quote(str(Path.cwd())) + " && exec " + run


def env_lines(env: dict) -> bytes:
    """What goes down ssh's stdin before the keys when `remote_command` got `env`: NAME=VALUE lines, an empty one."""
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode() + b"\n" if env else b""


def ssh_argv(args: LaunchOptions, host: HostSlots) -> list[str]:
    argv = ["ssh", *SSH_OPTIONS]
    if args.ssh_config:
        argv += ["-F", args.ssh_config]
    if args.ssh_port:
        argv += ["-p", str(args.ssh_port)]
    if args.ssh_identity:
        argv += ["-i", args.ssh_identity, "-o", "IdentitiesOnly=yes"]
    return argv + [host.host]


def ssh_failure(log_path: Path) -> str:
    """ssh's own one-line reason, from the host's log (exit 255 is ssh's; others are the agent's)."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    for ln in reversed(lines):
        if any(k in ln for k in ("Permission denied", "Host key verification failed", "Connection refused",
                                 "Could not resolve", "timed out", "No route to host", "No such file")):
            return ln.strip()
    return lines[-1].strip() if lines else "no output"


def launch_hosts(cfg: Config, args: LaunchOptions, progress: dict | None = None) -> int:
    lg = log.get()
    hosts = resolve_hosts(args)
    keys = RunKeys.read_coordinator_file(args.keys) if args.keys else RunKeys.generate()
    if cfg.dist.bind in ("127.0.0.1", "localhost") and any(h.hostname not in ("localhost", "127.0.0.1")
                                                           for h in hosts):
        lg.warning("the coordinator binds 127.0.0.1: remote hosts cannot reach it (set --bind to this host's address)")
    python = args.remote_python or sys.executable
    forwarded = forwarded_env(args.export)
    if forwarded:
        lg.info(f"environment forwarded to the hosts: {', '.join(sorted(forwarded))}")
    cfg.dist.transport = "socket"  # between hosts the weights and gradients are frames; shm is per host

    key_path = Path(cfg.train.out) / "agent-keys.json"
    no_ssh = {"run": None, "keys_written": False}  # for the failure note agents read instead of the keys
    if args.no_ssh:
        # An earlier start's keys (a requeued job's) must not be read by this start's agents: gone before the data
        # loads. Agents given this start's run id would wait past it anyway (the file names its run).
        key_path.unlink(missing_ok=True)

    def start(session: Session):
        no_ssh["run"] = session.run_id
        trainer = prepare_or_exit(cfg, args.resume, "launch")
        out = Path(cfg.train.out)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        welcome = {"config": config_mod.to_dict(cfg), "shm": {}, "num_classes": len(trainer.ds.class_names),
                   "fingerprint": trainer.ds.fingerprint, "class_names": trainer.ds.class_names}
        coord = session.coord = Coordinator(cfg, session.run_id, len(hosts), welcome, {"labels": trainer.ds.labels},
                                            curve_keys=keys, slots=[h.slots for h in hosts],
                                            max_frame=frame_limit(cfg, trainer.model, len(trainer.ds.labels)))
        endpoint = coord.endpoint
        lg.info(f"coordinator listening on {endpoint} (run {session.run_id}) for {len(hosts)} hosts, "
                f"{sum(h.slots for h in hosts)} workers, CURVE on")
        ranks = assign_ranks(hosts)
        lg.info("worker ranks: " + ", ".join(
            f"{h.hostname} {min(e.rank for e in ranks if e.host == h.host)}.."
            f"{max(e.rank for e in ranks if e.host == h.host)}" for h in hosts))
        if args.no_ssh:
            key_file = keys.write_agent_file(key_path, run=session.run_id)
            no_ssh["keys_written"] = True
            for i, h in enumerate(hosts):
                coord.adopt(i, h.hostname)
                cmd = agent_argv(python, endpoint, session.run_id, i, h, str(key_file.resolve()))
                if not args.remote_python:  # the console script, not `dptrain -m dptrain agent`
                    cmd = ["dptrain", *cmd[3:]]
                lg.info(f"on {h.hostname} run: {shlex.join(cmd)}")
            timeout = args.wait_agents_s
        else:
            secret = env_lines(forwarded) + (json.dumps(keys.for_agents()) + "\n").encode()

            def ssh_agent(i: int, join: bool = False):
                h = hosts[i]
                log_path = out / "logs" / f"host-{h.hostname}.log"
                argv = agent_argv(python, endpoint, session.run_id, i, h, "-") + (["--join"] if join else [])
                with open(log_path, "ab" if join else "wb") as f:
                    proc = subprocess.Popen(ssh_argv(args, h) + [remote_command(argv, forwarded)],
                                            stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                session.procs.append(proc)
                try:
                    proc.stdin.write(secret)  # the channel stays open: its closing tells the agent to stop
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass  # ssh already gave up (unknown host...): its exit code and words are reported below
                return proc, log_path

            for i, h in enumerate(hosts):
                coord.adopt(i, h.hostname, *ssh_agent(i))
            # a lost host's agent started again in its place (dist.max_worker_restarts; it joins the running job)
            coord.respawn = lambda peer: ssh_agent(peer.rank, join=True)
            timeout = args.wait_agents_s
        try:
            coord.wait_ready(timeout)
        except WorkerFailure:
            # the first failure ends the wait, but every host's ssh failure gets its line: give the others a moment
            deadline = time.monotonic() + SSH_REPORT_GRACE_S
            for p in coord.peers.values():
                if p.proc is not None and p.state is not PeerState.READY:
                    try:
                        p.proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            for p in coord.peers.values():
                if p.proc is not None and p.proc.poll() == 255:
                    lg.error(f"host {p.host}: ssh failed: {ssh_failure(p.log_path)}")
            raise
        lg.info(f"all {len(hosts)} hosts ready; {cfg.dist.plane} data plane, {cfg.dist.wire_dtype} wire")
        session.mesh = cfg.dist.plane == "mesh"
        return trainer, HostBuffers()  # gradients arrive as frames (one summed buffer per host)

    reason = "stopped"
    try:
        rc = run_session(cfg, args.stop_at_step, start, run_id=args.run_id, progress=progress)
        reason = f"it exited {rc}"
        return rc
    except BaseException as e:
        reason = str(e) if isinstance(e, SystemExit) and not isinstance(e.code, int) else type(e).__name__
        raise
    finally:
        if args.no_ssh and no_ssh["run"] and not no_ssh["keys_written"]:
            # Agents that a scheduler started are waiting for the key file: tell them, so the job ends now
            try:
                key_path.parent.mkdir(parents=True, exist_ok=True)
                write_launch_failure(key_path, no_ssh["run"], reason)
            except OSError as err:
                lg.warning(f"{key_path}: cannot tell the agents that the launch failed ({err.strerror})")
