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
import socket as pysocket
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .. import config as config_mod, log
from ..checkpoint import CheckpointWriteError
from ..config import Config
from ..data.shm import remove_orphans
from ..executors import ExecutorFailure
from ..train import EXIT_PREEMPTED
from . import localsum
from .coordinator import Coordinator
from .executor import DistExecutor, SharedUpdate
from .reduce import one_host_factored
from .session import Session, blas_threads, memory_warning, physical_cores, remove_stale_dirs
from .timeline import Timeline

EXIT_WORKER_LOST = 1
EXIT_INTERRUPTED = 130


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
    h.add_argument("-x", dest="export", action="append", metavar="NAME[=VALUE]",
                   help="forward an environment variable to the hosts (mpirun's -x; NAME alone: this value); "
                        "also ./.dptrain_env (NAME=VALUE lines) and OMP_*, OPENBLAS_*, MKL_* set here")
    h.add_argument("--tee", type=int, default=None, metavar="RANK",
                   help="also show this worker rank's log lines on the console (one host; each rank's full log "
                        "is in RUN/logs/)")
    h.add_argument("--max-restarts", type=int, default=0,
                   help="when a worker or host is lost under --on-worker-failure abort, start the run again from "
                        "last.npz, at most this many times over the run (only after a step succeeded)")
    h.add_argument("--keys", default=None,
                   help="the run's CURVE keys made in advance with `dptrain keys` (coordinator.json); default: "
                        "made now, agents get theirs over ssh or from RUN/agent-keys.json")
    h.add_argument("--run-id", default=None, type=_run_id,
                   help="fix the run id in advance (e.g. $SLURM_JOB_ID) so agents can be started with it; "
                        "default: random")


def add_internal_commands(sub) -> None:
    w = sub.add_parser("worker", help="(internal) a worker process; started by launch or an agent")
    w.add_argument("--connect", required=True)
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--run", required=True)
    w.set_defaults(func=_cmd_worker)

    k = sub.add_parser("keys", help="make a run's CURVE keys in advance (coordinator.json, agent.json; 0600)")
    k.add_argument("--out", required=True, help="folder for coordinator.json and agent.json")
    from .curve import cmd_keys
    k.set_defaults(func=cmd_keys)

    a = sub.add_parser("agent", help="a host's agent: starts its workers, reduces their gradients (multi-host)")
    a.add_argument("--connect", default=None,
                   help="the coordinator, tcp://HOST:PORT (default: MASTER_ADDR and MASTER_PORT, as torchrun sets)")
    a.add_argument("--run", default=os.environ.get("DPTRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
                   help="the run id the coordinator printed (default: $DPTRAIN_RUN_ID or $TORCHELASTIC_RUN_ID)")
    a.add_argument("--host-index", type=int, default=None,
                   help="this host's position in the hostfile (default: from SLURM_NODEID / OMPI / DPTRAIN_RANK)")
    a.add_argument("--slots", type=int, default=1, help="workers on this host")
    a.add_argument("--keys", help="the run's agent key file (no-ssh mode)")
    a.add_argument("--keys-stdin", action="store_true", help="read the keys from stdin; exit when stdin closes (ssh)")
    a.add_argument("--wait-keys-s", type=float, default=60.0, help="wait this long for --keys to appear")
    a.add_argument("--host-label", default=None, help="name for logs (default: hostname)")
    a.add_argument("--join", action="store_true",
                   help="take the place of a lost host in a running job (--on-worker-failure continue); "
                        "with --host-index, that one if it is lost, else any lost host with as many slots")
    a.set_defaults(func=_cmd_agent)


def _cmd_worker(args, extra) -> int:
    from .worker import run_worker
    return run_worker(args.connect, args.rank, args.run)


def _cmd_agent(args, extra) -> int:
    from .agent import run_agent
    return run_agent(args)


def _run_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-64 of [A-Za-z0-9_-] (it names shared memory)")
    return text


class Tee(threading.Thread):
    """Mirrors a log file's new lines to stderr, prefixed, until stopped (`launch --tee RANK`)."""

    def __init__(self, path: Path, prefix: str):
        super().__init__(daemon=True, name="tee")
        self.path, self.prefix, self.done = path, prefix, threading.Event()
        self.start()

    def run(self) -> None:
        pos = 0
        while True:
            stopping = self.done.wait(0.2)
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1
            for line in chunk[:end].decode(errors="replace").splitlines():
                sys.stderr.write(self.prefix + line + "\n")
            sys.stderr.flush()
            pos += end
            if stopping:
                return

    def stop(self) -> None:
        self.done.set()
        self.join(2)


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def launch(cfg: Config, args) -> int:
    if cfg.dist.workers == 0 and not _many_hosts(args):  # the single-process fallback: the same math, no sockets
        from ..cli import exit_code
        from ..train import run_local
        summary = run_local(cfg, args.resume, args.stop_at_step, command="launch")
        print(json.dumps(summary))
        return exit_code(summary)
    lg = log.get()
    limit = getattr(args, "max_restarts", 0) or 0
    if limit and getattr(args, "no_ssh", False):
        raise SystemExit("dptrain launch: --max-restarts needs agents this launcher starts (not --no-ssh)")
    if _many_hosts(args) and cfg.dist.plane == "mesh" and cfg.train.ema_epochs > 0:
        raise SystemExit(f"dptrain launch: train.ema_epochs = {cfg.train.ema_epochs} averages every step's weights "
                         f"at the coordinator, which the mesh data plane sends it only every dist.sync_every steps: "
                         f"add --train.ema_epochs=0, or --plane star")
    restarts = 0
    while True:
        progress = {"restarts": restarts}
        if _many_hosts(args):
            from .hosts import launch_hosts
            rc = launch_hosts(cfg, args, progress)
        else:
            rc = launch_local(cfg, resume=args.resume, stop_at_step=args.stop_at_step, progress=progress,
                              tee=getattr(args, "tee", None))
        if rc != EXIT_WORKER_LOST or restarts >= limit:
            return rc
        if not progress.get("steps"):  # a run that cannot take a step fails; it does not loop
            lg.error(f"not restarting: no step succeeded since the last start (restart {restarts} of {limit})")
            return rc
        restarts += 1
        args.resume = "auto"
        lg.warning(f"restart {restarts} of {limit} (--max-restarts): starting again from last.npz")


def _many_hosts(args) -> bool:
    return bool(getattr(args, "hostfile", None) or getattr(args, "hosts", None) or getattr(args, "no_ssh", False))


def run_session(cfg: Config, stop_at_step: int, start, run_id: str | None = None,
                progress: dict | None = None) -> int:
    """`start(session)` loads data, starts the peers and returns (trainer, grad_slots, shared, factor_slots) once
    they are READY, with session.coord set; this trains, prints the summary, and maps the ways a run ends to exit codes.
    progress (--max-restarts): in, "restarts" (how many starts came before this one); out, "steps" (the steps this
    start got done)."""
    lg = log.get()
    remove_stale_dirs()
    session = Session(run_id or uuid.uuid4().hex[:10], cfg.dist.shm_dir)  # a bad dist.shm_dir exits here
    orphans = remove_orphans(session.shm_dir)
    if orphans:
        lg.warning(f"removed {len(orphans)} shared-memory segment(s) left by dead runs: {', '.join(orphans[:4])}")
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    # The workers own the cores; the coordinator's few BLAS calls (norms) must not spin up threads against them.
    blas = threadpool_limits(1)
    executor = trainer = None
    first_step = 0
    try:
        trainer, grad_slots, shared, factor_slots = start(session)
        restarts = trainer.restarts = (progress or {}).get("restarts", 0)
        first_step = trainer.step
        if restarts:  # in metrics.jsonl too, where the curve restarts from
            trainer.write({"restart": restarts, "step": trainer.step, "epoch": trainer.epoch})
        timeline = Timeline(cfg.dist.timeline) if cfg.dist.timeline else None
        executor = DistExecutor(session.coord, trainer.store, trainer.opt, cfg, grad_slots, shared, timeline,
                                mesh=session.mesh, factor_slots=factor_slots, local_bn=session.local_bn,
                                reducers=physical_cores())
        summary = trainer.fit(executor, stop_at_step=stop_at_step)
        print(json.dumps(summary))
        return EXIT_PREEMPTED if trainer.preempted else EXIT_INTERRUPTED if trainer.stop_requested else 0
    except CheckpointWriteError as e:
        lg.error(f"training finished but its last checkpoint is not on disk: {e}")
        return 1
    except ExecutorFailure as e:  # a lost worker or host, a replica mismatch: last.npz is written if training began
        lg.error(f"aborting: {e}")
        if progress is not None and trainer is not None:
            progress["steps"] = trainer.step - first_step
        return EXIT_WORKER_LOST
    except (KeyboardInterrupt, _Terminated):
        lg.error("interrupted; stopping every worker")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, old_term)
        blas.restore_original_limits()
        if executor is not None:
            executor.close()
        session.close()


def launch_local(cfg: Config, resume: bool | str = False, stop_at_step: int = 0, progress: dict | None = None,
                 tee: int | None = None) -> int:
    from ..train import prepare_or_exit
    lg = log.get()
    n = cfg.dist.workers
    use_shm = cfg.dist.transport == "shm"
    by_workers = use_shm and cfg.dist.update == "workers"
    shm: dict = {}

    def start(session: Session):
        def to_shm(store, model, ds) -> None:
            """Check that every segment of the run fits before making any (segment_layout); then weights and BN
            buffers into shared memory (with dist.update = "workers": double buffers, and the reduced gradient too;
            otherwise the coordinator's gradient stays private)."""
            L = session.plan(segment_layout(cfg, n, store, model, ds.images.shape))
            if not use_shm:
                return
            if by_workers:
                shm["params"] = session.shared("params", *L["params"])
                shm["params"].array[0] = store.params
                shm["velocity"] = session.shared("velocity", *L["velocity"])
                shm["gsum"] = session.shared("gsum", *L["gsum"])
                params, grads = shm["params"].array[0], shm["gsum"].array
            else:
                shm["params"] = session.shared("params", *L["params"], store.params)
                params, grads = shm["params"].array, store.grads
            shm["buffers"] = session.shared("buffers", *L["buffers"], store.buffers)
            store.rebind(params, grads, shm["buffers"].array, copy=False)

        trainer = prepare_or_exit(cfg, resume, "launch", store_factory=to_shm)
        L = session.layout
        if "ema" in L:  # the (possibly resumed) average into the workers' double buffer
            shm["ema"] = session.shared("ema", *L["ema"])
            shm["ema"].array[0] = trainer.ema.params
            trainer.ema.params = shm["ema"].array[0]
        out = Path(cfg.train.out)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        images = session.shared("images", *L["images"], trainer.ds.images)
        trainer.ds.images = images.array  # one copy of the images on this host: the shared one
        shm_specs = {"images": images.spec(), **{k: seg.spec() for k, seg in shm.items()}}
        grad_slots = shared = factor_slots = None
        factored = {}
        if use_shm:
            grads = session.shared("grads", *L["grads"])  # --batch-invariant: exact int64 sums
            grad_slots, shm_specs["grads"] = grads.array, grads.spec()
        if "bnsum" in L:  # the BN sums among the workers
            rows, seen = session.shared("bnsum", *L["bnsum"]), session.shared("bnseen", *L["bnseen"])
            shm_specs["bnsum"], shm_specs["bnseen"], session.local_bn = rows.spec(), seen.spec(), True
        if by_workers:  # the (possibly resumed) velocity moves into the shared double buffer
            velocity2 = shm["velocity"].array
            velocity2[0] = trainer.opt.velocity
            trainer.opt.velocity = velocity2[0]
            shared = SharedUpdate(shm["params"].array, velocity2, shm["gsum"].array,
                                  shm["ema"].array if "ema" in shm else None, trainer.ema)
        layer = one_host_factored(cfg, trainer.model, n)
        if layer is not None:  # each rank's hidden-Linear inputs and output gradients, up to a whole batch each
            factor_slots, factored = session.factor_arrays(layer, n, cfg.train.batch_size)
        welcome = {"config": config_mod.to_dict(cfg), "shm": shm_specs, "num_classes": len(trainer.ds.class_names),
                   "factored": factored}
        session.coord = Coordinator(cfg, session.run_id, n, welcome, {"labels": trainer.ds.labels},
                                    endpoint=None if cfg.dist.port else session.local_endpoint(),
                                    token=session.token)
        lg.info(f"coordinator listening on {session.coord.endpoint} (run {session.run_id}); starting {n} workers, "
                f"{blas_threads(cfg, n)} BLAS thread(s) each, {cfg.dist.transport} transport, bn={cfg.dist.bn}"
                + (", update by the workers" if by_workers else "")
                + (", the hidden Linear's weight gradient from its factors" if factor_slots else ""))
        if tee is not None:
            if not 0 <= tee < n:
                raise SystemExit(f"dptrain launch: --tee {tee}: no such rank (0..{n - 1})")
            session.tee = Tee(out / "logs" / f"rank{tee}.log", f"rank{tee} | ")
        warning = memory_warning(cfg, trainer.store.num_params, n)
        if warning:
            lg.warning(warning)
        cores = physical_cores()
        if n > cores:  # the same mathematics, but smaller shards computed less efficiently on shared cores
            lg.warning(f"{n} workers on {cores} physical core(s): they take turns on the cores and each computes a "
                       f"smaller shard, less efficiently (8 workers on 2 cores measured ~0.9x the images/s of 2); "
                       f"--workers auto starts one per physical core")
        session.start_workers(cfg, pysocket.gethostname(), [out / "logs" / f"rank{r}.log" for r in range(n)])
        lg.info(f"all {n} workers ready")
        return trainer, grad_slots, shared, factor_slots

    return run_session(cfg, stop_at_step, start, progress=progress)


def segment_layout(cfg: Config, n: int, store, model, images_shape) -> dict:
    """Every shared-memory segment launch_local makes for n workers: what -> (shape, dtype). The session checks
    their total against the free space before the first is made, and makes only these."""
    P, f32 = store.num_params, np.float32
    use_shm = cfg.dist.transport == "shm"
    by_workers = use_shm and cfg.dist.update == "workers"
    L = {"images": (tuple(images_shape), np.uint8)}
    if use_shm:
        L["params"] = ((2, P) if by_workers else (P,), f32)
        L["buffers"] = ((store.num_buffers,), f32)
        L["grads"] = ((n, P), np.int64 if cfg.train.batch_invariant_block else f32)
    if by_workers:
        L["velocity"], L["gsum"] = ((2, P), f32), ((P,), f32)
        if cfg.train.ema_epochs > 0:  # Trainer keeps a weight average (ema.py)
            L["ema"] = ((2, P), f32)
    if use_shm and cfg.dist.bn == "sync" and localsum.supported():
        L["bnsum"], L["bnseen"] = ((2, n, localsum.width(model)), np.float64), ((n,), np.int64)
    layer = one_host_factored(cfg, model, n)
    if layer is not None:  # Session.factor_arrays: up to a whole batch per rank (after losses one may get it)
        K, F = layer.w.shape
        L["fx"], L["fdy"] = ((n, cfg.train.batch_size, K), f32), ((n, cfg.train.batch_size, F), f32)
    return L
