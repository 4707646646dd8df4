"""`dptrain launch`: a coordinator in this process and worker processes, on one host (or many, see hosts.py).

    dptrain launch --workers 4 --data data/synth --epochs 5 --out runs/x [--bn sync] [--on-worker-failure continue]

What it does, in order: load the dataset (decoded once, cached on disk), copy the uint8 images, the weights, the BN
buffers and one gradient slot per rank into named shared memory, bind the ROUTER (port 0 = a free port, printed),
start N workers (`python -m dptrain worker ...`, BLAS threads = cores // N, logs in RUN/logs/rank<R>.log, each in
its own session so a terminal's Ctrl-C reaches only this process), wait for every READY, train, stop everyone.

Environment for workers: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS = dist.blas_threads or
cores // N (at least 1), set before numpy loads in the child.
Exit codes: 0 done; 1 a worker was lost under `abort` (a checkpoint was written first; the log names the rank);
130 stopped by Ctrl-C / SIGTERM (checkpoint written, every worker and shared-memory segment gone).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

from .. import config as config_mod
from .. import log
from ..config import Config
from ..data.shm import SharedArray, remove_orphans, segment_name
from .coordinator import Coordinator, StopTimeout, WorkerFailure
from .executor import DistExecutor, Timeline

EXIT_WORKER_LOST = 1
EXIT_INTERRUPTED = 130
STOP_GRACE_S = 10.0  # after Ctrl-C / SIGTERM the running step gets this long before everything is torn down


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("many hosts")
    h.add_argument("--hostfile", help="lines of `host slots=N` (OpenMPI/Horovod/DeepSpeed format)")
    h.add_argument("-H", "--hosts", help="host list like a:2,b:2")
    h.add_argument("--include", help="only these hosts/slots (DeepSpeed syntax: a@b:0,1)")
    h.add_argument("--exclude", help="not these hosts/slots")
    h.add_argument("--ssh-port", type=int, default=None)
    h.add_argument("--ssh-identity", default=None)
    h.add_argument("--ssh-config", default=None, help="ssh -F file")
    h.add_argument("--no-ssh", action="store_true",
                   help="print the `dptrain agent` command each host must run, and wait for them")
    h.add_argument("--remote-python", default=None, help="python on the hosts (default: this one's path)")
    h.add_argument("--wait-agents-s", type=float, default=120.0, help="how long to wait for every host's READY")
    h.add_argument("--run-id", default=None, type=_run_id,
                   help="fix the run id in advance (e.g. $SLURM_JOB_ID) so agents can be started with it; "
                        "default: random")


def add_internal_commands(sub) -> None:
    w = sub.add_parser("worker", help="(internal) a worker process; started by launch or an agent")
    w.add_argument("--connect", required=True)
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--run", required=True)
    w.set_defaults(func=_cmd_worker)

    a = sub.add_parser("agent", help="a host's agent: starts its workers, reduces their gradients (multi-host)")
    a.add_argument("--connect", required=True, help="the coordinator, tcp://HOST:PORT")
    a.add_argument("--run", required=True, help="the run id the coordinator printed")
    a.add_argument("--host-index", type=int, default=None,
                   help="this host's position in the hostfile (default: from SLURM_NODEID / OMPI / DPTRAIN_RANK)")
    a.add_argument("--slots", type=int, default=1, help="workers on this host")
    a.add_argument("--keys", help="the run's agent key file (no-ssh mode)")
    a.add_argument("--keys-stdin", action="store_true", help="read the keys from stdin; exit when stdin closes (ssh)")
    a.add_argument("--wait-keys-s", type=float, default=60.0, help="wait this long for --keys to appear")
    a.add_argument("--host-label", default=None, help="name for logs (default: hostname)")
    a.set_defaults(func=_cmd_agent)


def _cmd_worker(args, extra) -> int:
    from .worker import run_worker
    return run_worker(args.connect, args.rank, args.run)


def _cmd_agent(args, extra) -> int:
    from .agent import run_agent
    return run_agent(args)


def blas_threads(cfg: Config, n_local: int) -> int:
    return cfg.dist.blas_threads or max(1, (os.cpu_count() or 1) // max(n_local, 1))


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_worker(endpoint: str, rank: int, run_id: str, env: dict, log_path: Path, pin_core: int | None = None):
    cmd = [sys.executable, "-m", "dptrain", "worker", "--connect", endpoint, "--rank", str(rank), "--run", run_id]
    with open(log_path, "ab") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    if pin_core is not None:
        try:
            psutil.Process(proc.pid).cpu_affinity([pin_core])
        except (psutil.Error, AttributeError, ValueError) as e:
            log.get().warning(f"could not pin rank {rank} to core {pin_core}: {e}")
    return proc


def reap(procs: list, grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL: nothing outlives the launcher."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _run_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-64 of [A-Za-z0-9_-] (it names shared memory)")
    return text


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def launch(cfg: Config, args) -> int:
    if getattr(args, "hostfile", None) or getattr(args, "hosts", None) or getattr(args, "no_ssh", False):
        from .hosts import launch_hosts
        return launch_hosts(cfg, args)
    if cfg.dist.workers == 0:  # the single-process fallback: the same math, no sockets
        from ..train import run_local
        print(json.dumps(run_local(cfg, args.resume, args.stop_at_step, command="launch")))
        return 0
    return launch_local(cfg, resume=args.resume, stop_at_step=args.stop_at_step)


class Session:
    """Everything a launch started, torn down in `close()` whatever happened: STOP to every peer, then SIGTERM /
    SIGKILL to every child process, then the sockets, then the shared-memory segments."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.segments: list[SharedArray] = []
        self.procs: list = []
        self.coord: Coordinator | None = None
        self.executor: DistExecutor | None = None
        self.trainer = None

    def shared(self, what: str, shape, dtype, fill=None) -> SharedArray:
        seg = SharedArray.create(fill, segment_name(self.run_id, what), shape=shape, dtype=dtype, writable=True)
        self.segments.append(seg)
        return seg

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        if self.coord is not None:
            self.coord.stop_all("run finished")
            time.sleep(0.05)  # let STOP leave before the socket closes
        reap(self.procs)
        if self.coord is not None:
            self.coord.close()
        for seg in self.segments:
            seg.close()
            if seg.owner:
                seg.unlink()


def run_session(cfg: Config, stop_at_step: int, start, run_id: str | None = None) -> int:
    """`start(session)` loads data, starts the peers and returns once they are READY (setting session.trainer,
    session.coord and the gradient slots); this trains, reports, and maps failures to exit codes."""
    lg = log.get()
    orphans = remove_orphans()
    if orphans:
        lg.warning(f"removed {len(orphans)} shared-memory segment(s) left by dead runs: {', '.join(orphans[:4])}")
    session = Session(run_id or uuid.uuid4().hex[:10])
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    # The workers own the cores; the coordinator's few BLAS calls (norms) must not spin up threads against them.
    blas = threadpool_limits(1)
    try:
        grad_slots = start(session)
        trainer, coord = session.trainer, session.coord
        trainer.on_stop_request = lambda: setattr(coord, "stop_deadline", time.monotonic() + STOP_GRACE_S)
        timeline = Timeline(cfg.dist.timeline) if cfg.dist.timeline else None
        session.executor = DistExecutor(coord, trainer, grad_slots, cfg.dist.on_worker_failure, timeline)
        summary = trainer.fit(session.executor, stop_at_step=stop_at_step)
        summary["breakdown"] = session.executor.breakdown()
        (Path(cfg.train.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
        return EXIT_INTERRUPTED if trainer.stop_requested else 0
    except WorkerFailure as e:
        lg.error(f"aborting: {e}")
        if session.trainer is not None and session.executor is not None:  # not when start-up/preflight failed
            session.trainer.save("last")
            lg.error(f"checkpoint written to {Path(cfg.train.out) / 'last.npz'} (step {session.trainer.step}); "
                     f"resume with --resume")
        return EXIT_WORKER_LOST
    except (KeyboardInterrupt, _Terminated) as e:
        lg.error("interrupted; stopping every worker")
        if isinstance(e, StopTimeout) and session.trainer is not None:  # the step never finished: keep the last one
            session.trainer.save("last")
            lg.error(f"checkpoint written to {Path(cfg.train.out) / 'last.npz'} (step {session.trainer.step})")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, old_term)
        blas.restore_original_limits()
        session.close()


def launch_local(cfg: Config, resume: bool = False, stop_at_step: int = 0) -> int:
    from ..train import prepare_or_exit
    lg = log.get()
    n = cfg.dist.workers
    use_shm = cfg.dist.transport == "shm"

    def start(session: Session):
        def to_shm(store) -> None:
            if use_shm:  # weights and BN buffers live in shared memory; the coordinator's grads stay private
                store.rebind(session.shared("params", store.params.shape, np.float32, store.params).array,
                             store.grads,
                             session.shared("buffers", store.buffers.shape, np.float32, store.buffers).array,
                             copy=False)

        trainer = session.trainer = prepare_or_exit(cfg, resume, "launch", store_factory=to_shm)
        out = Path(cfg.train.out)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        images = session.shared("images", trainer.ds.images.shape, np.uint8, trainer.ds.images)
        trainer.ds.images = images.array  # one copy of the images on this host: the shared one
        shm_specs = {"images": images.spec()}
        grad_slots = None
        if use_shm:
            shm_specs["params"], shm_specs["buffers"] = session.segments[0].spec(), session.segments[1].spec()
            grads = session.shared("grads", (n, trainer.store.num_params), np.float32)
            grad_slots, shm_specs["grads"] = grads.array, grads.spec()
        welcome = {"config": config_mod.to_dict(cfg), "shm": shm_specs, "num_classes": len(trainer.ds.class_names)}
        coord = session.coord = Coordinator(cfg, session.run_id, n, welcome, {"labels": trainer.ds.labels})
        lg.info(f"coordinator listening on {coord.endpoint} (run {session.run_id}); starting {n} workers, "
                f"{blas_threads(cfg, n)} BLAS thread(s) each, {cfg.dist.transport} transport, bn={cfg.dist.bn}")
        env = worker_env(blas_threads(cfg, n))
        cores = os.cpu_count() or 1
        for r in range(n):
            log_path = out / "logs" / f"rank{r}.log"
            log_path.write_bytes(b"")
            proc = spawn_worker(coord.endpoint, r, session.run_id, env, log_path,
                                (r % cores) if cfg.dist.pin_cores else None)
            session.procs.append(proc)
            coord.peers[r].proc, coord.peers[r].pid, coord.peers[r].log_path = proc, proc.pid, log_path
        coord.wait_ready()
        lg.info(f"all {n} workers ready")
        return grad_slots

    return run_session(cfg, stop_at_step, start)
