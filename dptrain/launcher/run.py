"""One start of a launched run, whatever started its peers: the coordinator's training loop over a DistExecutor,
and the ways a run ends mapped to exit codes (0 done; 1 a worker or host lost; 75 preempted; 130 interrupted).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import uuid
from pathlib import Path

from threadpoolctl import threadpool_limits

from .. import log
from ..checkpoint import CheckpointWriteError
from ..config import Config
from ..data.shm import remove_orphans
from ..distributed.executor import DistExecutor
from ..distributed.session import Session, physical_cores, remove_stale_dirs
from ..distributed.timeline import Timeline
from ..executors import ExecutorFailure
from ..train import EXIT_PREEMPTED

EXIT_WORKER_LOST = 1
EXIT_INTERRUPTED = 130


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


def run_session(cfg: Config, stop_at_step: int, start, run_id: str | None = None,
                progress: dict | None = None) -> int:
    """`start(session)` loads data, starts the peers and returns (trainer, HostBuffers) once
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
        trainer, buffers = start(session)
        restarts = trainer.restarts = (progress or {}).get("restarts", 0)
        first_step = trainer.step
        if restarts:  # in metrics.jsonl too, where the curve restarts from
            trainer.write({"restart": restarts, "step": trainer.step, "epoch": trainer.epoch})
        timeline = Timeline(cfg.dist.timeline) if cfg.dist.timeline else None
        buffers.local_bn, buffers.mesh, buffers.reducers = session.local_bn, session.mesh, physical_cores()
        executor = DistExecutor(session.coord, trainer.store, trainer.opt, cfg, buffers, timeline)
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


