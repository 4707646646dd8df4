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

import socket as pysocket
from pathlib import Path

import numpy as np

from .. import config as config_mod, log
from ..config import Config
from ..distributed import localsum
from ..distributed.coordinator import Coordinator
from ..distributed.datapaths import HostBuffers, SharedUpdate
from ..distributed.reduce import one_host_factored
from ..distributed.session import Session, blas_threads, factor_layout, frame_limit, memory_warning, physical_cores
from ..train import prepare_or_exit
from .run import Tee, run_session


def launch_local(cfg: Config, resume: bool | str = False, stop_at_step: int = 0, progress: dict | None = None,
                 tee: int | None = None) -> int:
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
                                    token=session.token,
                                    max_frame=frame_limit(cfg, trainer.model, len(trainer.ds.labels)))
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
                       f"smaller shard, less efficiently (docs/benchmarks.md has the measured cost); "
                       f"--workers auto starts one per physical core")
        session.start_workers(cfg, pysocket.gethostname(), [out / "logs" / f"rank{r}.log" for r in range(n)])
        lg.info(f"all {n} workers ready")
        return trainer, HostBuffers(grad_slots=grad_slots, shared=shared, factor_slots=factor_slots)

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
        L.update(factor_layout(layer, n, cfg.train.batch_size))
    return L
