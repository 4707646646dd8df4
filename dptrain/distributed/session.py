"""What one host's side of a run starts and must tear down: processes, shared memory, the coordinator socket.

`Session` collects them as they are made and `close()` undoes them whatever happened: STOP to every peer, then
SIGTERM / SIGKILL to every child process, then the socket, then the shared-memory segments. `start_workers` spawns
a host's workers (`python -m dptrain worker ...`, each in its own session so a terminal's Ctrl-C reaches only the
launcher, BLAS threads = cores // N set before numpy loads) and hands each to the coordinator with `adopt`; the
launcher (one host) and an agent (one host of many) both use it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket as pysocket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from .. import log
from ..config import Config
from ..data.shm import NoSpace, SharedArray, check_space, free_bytes, segment_dir, segment_name
from . import invariant, protocol as P, timeslice
from .coordinator import Coordinator


def worker_memory_bytes(cfg: Config, num_params: int, batch: int) -> int:
    """A worker's estimated resident memory: the interpreter and numpy (~40 MB), its gradient slot, weights view and
    scratch (3 × 4P), and activations for its shard, scaled from the default model's 9.7 MB per 64×64 image at
    first-layer width 32 (a worker's PSS over batch sizes: docs/performance-notes.md)."""
    widths = cfg.model.widths or [32]
    per_image = 9.7e6 * (cfg.data.image_size / 64) ** 2 * (widths[0] / 32)
    return int(40e6 + 12 * num_params + batch * per_image)


def memory_warning(cfg: Config, num_params: int, workers: int) -> str | None:
    """A line for the launcher when `workers` workers would likely not fit in this host's available memory."""
    b = -(-cfg.train.batch_size // max(workers, 1))
    need = workers * worker_memory_bytes(cfg, num_params, b)
    avail = psutil.virtual_memory().available
    if need <= avail:
        return None
    return (f"{workers} workers need about {need / 1e9:.1f} GB ({need / workers / 1e6:,.0f} MB each at {b} images), "
            f"this host has {avail / 1e9:.1f} GB available: expect the kernel's OOM killer; fewer workers, a smaller "
            f"batch or --image-size would fit")


def blas_threads(cfg: Config, n_local: int) -> int:
    return cfg.dist.blas_threads or max(1, (os.cpu_count() or 1) // max(n_local, 1))


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads share a core's FPUs: workers beyond them add no GEMM speed)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def worker_env(threads: int, slice_ms: float = 0) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env[timeslice.ENV] = str(slice_ms)
    return env


def worker_slice_ms(cfg: Config, workers: int) -> float:
    """dist.timeslice_ms, where -1 (auto) means the longest slice when the workers outnumber the physical cores
    (timeslice.py) and the kernel's default otherwise, and with --bn sync: its 14 barriers a step want a rank that
    waits to hand the core over at once, which a long slice would delay."""
    if cfg.dist.timeslice_ms >= 0:
        return cfg.dist.timeslice_ms
    return timeslice.MAX_MS if workers > physical_cores() and cfg.dist.bn != "sync" else 0


def frame_limit(cfg: Config, model, num_images: int) -> int:
    """ZMQ_MAXMSGSIZE of every socket of a run of `model` on `num_images` images (protocol.max_frame_bytes)."""
    layer = model.factor_layer() if cfg.dist.factored else None
    moments = model.bn_moments_size * (invariant.LIMBS if invariant.enabled(cfg) else 1)  # exact sums: in limbs
    return P.max_frame_bytes(model.store.num_params, model.store.num_buffers, moments, num_images,
                             cfg.train.batch_size, layer.w.shape if layer is not None else (0, 0))


SOCKET_NAME = "coordinator"  # the local coordinator's ipc:// socket inside a run's private directory


def runtime_base() -> Path:
    """Where this user's runs keep their private directories: $DPTRAIN_RUNTIME_DIR or /tmp/dptrain-UID."""
    return Path(os.environ.get("DPTRAIN_RUNTIME_DIR") or f"/tmp/dptrain-{os.getuid()}")


def private_dir(run_id: str) -> Path:
    """A directory only this user can enter, for the run's local socket: /tmp/dptrain-UID/RUN, both levels 0700 and
    ours (a directory someone else made, or a symlink, is refused: it could be theirs to listen in)."""
    base = runtime_base()
    for d in (base, base / run_id):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise SystemExit(f"{d} is not a directory of this user: refusing to put the run's socket there")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)
    return base / run_id


def remove_stale_dirs() -> list[str]:
    """Private run directories whose coordinator is gone (killed before it could clean up): nobody listens on
    their socket any more."""
    base = runtime_base()
    gone = []
    for d in base.glob("*") if base.is_dir() else []:
        sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            sock.connect(str(d / SOCKET_NAME))
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
        except OSError:
            pass
        finally:
            sock.close()
    return gone


# More workers than physical cores: the workers run this much nicer than their coordinator, so that handing out a
# step (a message to each worker, one after the other) is not preempted by the workers it has already woken; they
# then start nearly together instead of a scheduler slice or more apart, and finish together; not applied when every
# worker has a core of its own.
OVERSUBSCRIBED_NICE = 5


def spawn_worker(endpoint: str, rank: int, run_id: str, env: dict, log_path: Path, token: str,
                 pin_core: int | None = None, nice: int = 0, max_frame: int = 0):
    """A worker process; the run's token and its sockets' frame limit (`frame_limit`; 0: none) reach it on its
    stdin (never its command line: `ps` shows that). nice > 0: the process runs that much nicer (raising niceness
    needs no privilege)."""
    cmd = [sys.executable, "-m", "dptrain", "worker", "--connect", endpoint, "--rank", str(rank), "--run", run_id]
    with open(log_path, "ab") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        proc.stdin.write(f"{token} {max_frame}\n".encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at once: its exit code and log are reported by the coordinator
    if pin_core is not None:
        try:
            psutil.Process(proc.pid).cpu_affinity([pin_core])
        except (psutil.Error, AttributeError, ValueError) as e:
            log.get().warning(f"could not pin rank {rank} to core {pin_core}: {e}")
    lower_priority(proc.pid, nice, f"rank {rank}")
    return proc


def lower_priority(pid: int, nice: int, who: str) -> None:
    """Make process `pid` run `nice` steps nicer than this one (no privilege needed); a failure is a warning."""
    if not nice:
        return
    try:
        psutil.Process(pid).nice(psutil.Process().nice() + nice)
    except (psutil.Error, OSError) as e:
        log.get().warning(f"could not lower {who}'s priority: {e}")


def worker_setup(cfg: Config, workers: int) -> tuple[dict, int]:
    """The environment (BLAS threads, scheduler slice) and the extra niceness the launcher gives each of `workers`
    workers on this host; `bench --ceiling` starts its processes with the same."""
    nice = OVERSUBSCRIBED_NICE if workers > physical_cores() else 0
    return worker_env(blas_threads(cfg, workers), worker_slice_ms(cfg, workers)), nice


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


def _or_exit(fn, *args, **kwargs):
    """fn(...), with NoSpace (the segments do not fit, or their folder is unusable) as a one-line exit."""
    try:
        return fn(*args, **kwargs)
    except NoSpace as e:
        raise SystemExit(f"dptrain: {e}") from None


def factor_layout(layer, slots: int, cap: int) -> dict:
    """The factored Linear's segments (Session.factor_arrays) in a layout for Session.plan: every worker's inputs
    (slots, cap, K) and output gradients (slots, cap, F), float32."""
    K, F = layer.w.shape
    return {"fx": ((slots, cap, K), np.float32), "fdy": ((slots, cap, F), np.float32)}


class Session:
    """Everything one host's side of a run started, torn down in `close()`."""

    def __init__(self, run_id: str, shm_dir: str = ""):
        self.run_id = run_id
        self.shm_dir = _or_exit(segment_dir, shm_dir)  # "" = /dev/shm; dist.shm_dir or $DPTRAIN_SHM_DIR
        self.layout: dict | None = None  # what -> (shape, dtype) of every segment, once plan() checked them
        self.segments: list[SharedArray] = []
        self.procs: list = []
        self.coord: Coordinator | None = None
        self.mesh = False  # the peers are host agents on the mesh data plane (launch --hostfile, dist.plane mesh)
        self.local_bn = False  # one host, --bn sync: the workers sum BN moments in shared memory (localsum.py)
        self.token = secrets.token_hex(16)  # what this session's workers prove they were started by it with
        self.dir: Path | None = None  # private_dir, once a local socket lives there
        self.tee = None  # launch --tee: a thread mirroring one rank's log (stopped at close)

    def local_endpoint(self) -> str:
        """ipc:// in this user's private run directory: no other user can connect (the file system says so)."""
        self.dir = private_dir(self.run_id)
        return f"ipc://{self.dir / SOCKET_NAME}"

    def plan(self, layout: dict) -> dict:
        """Check that segments of `layout` (what -> (shape, dtype)) fit in the free space of the segments' filesystem
        before any is made (else exit with one line naming both figures and the fixes); then shared() makes only
        these, with these shapes. Returns layout."""
        sizes = {what: int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for what, (shape, dt) in
                 layout.items()}
        need = _or_exit(check_space, sizes, self.shm_dir)
        log.get().info(f"shared memory: {len(sizes)} segments, {need / 2**20:,.1f} MB in "
                       f"{self.shm_dir or '/dev/shm'} ({free_bytes(self.shm_dir) / 2**20:,.1f} MB free)")
        self.layout = dict(layout)
        return self.layout

    def shared(self, what: str, shape, dtype, fill=None) -> SharedArray:
        """A writable segment of this run, its pages reserved: no room exits with one line, never a SIGBUS later."""
        if self.layout is not None:  # the capacity check must have counted it
            planned = self.layout.get(what)
            if planned is None or tuple(planned[0]) != tuple(shape) or np.dtype(planned[1]) != np.dtype(dtype):
                raise RuntimeError(f"segment {what!r} {tuple(shape)} {np.dtype(dtype)} is not the planned {planned}")
        seg = _or_exit(SharedArray.create, fill, segment_name(self.run_id, what), shape=shape, dtype=dtype,
                       writable=True, where=self.shm_dir)
        self.segments.append(seg)
        return seg

    def factor_arrays(self, layer, slots: int, cap: int) -> tuple[tuple, dict]:
        """Shared arrays for the factored Linear `layer` (dist.factored): every worker's inputs (slots, cap, K) and
        output gradients (slots, cap, F), up to `cap` samples each (after losses one worker may get the whole batch;
        tmpfs allocates only the pages written). Returns (w0, K, F, x, dy) and WELCOME's `factored` field."""
        K, F = layer.w.shape
        fx, fdy = (self.shared(what, *spec) for what, spec in factor_layout(layer, slots, cap).items())
        return (layer.w.offset, K, F, fx.array, fdy.array), {"x": fx.spec(), "dy": fdy.spec()}

    def start_workers(self, cfg: Config, host: str, log_paths: list[Path]) -> None:
        """Spawn one worker per log path (local ranks 0..n-1 of self.coord) and wait until every one is READY."""
        n = len(log_paths)
        env, nice = worker_setup(cfg, n)
        cores = os.cpu_count() or 1

        def spawn(r: int, path: Path):
            proc = spawn_worker(self.coord.endpoint, r, self.run_id, env, path, self.token,
                                (r % cores) if cfg.dist.pin_cores else None, nice, self.coord.max_frame)
            self.procs.append(proc)
            return proc

        for r, path in enumerate(log_paths):
            path.write_bytes(b"")
            self.coord.adopt(r, host, spawn(r, path), path)
        # a lost worker's replacement (dist.max_worker_restarts): the same rank, environment and log file
        self.coord.respawn = lambda peer: (spawn(peer.rank, peer.log_path), peer.log_path)
        self.coord.wait_ready()

    def close(self) -> None:
        if self.coord is not None:
            self.coord.stop_all("run finished")
            time.sleep(0.05)  # let STOP leave before the socket closes
        reap(self.procs)
        if self.tee is not None:
            self.tee.stop()
        if self.coord is not None:
            self.coord.close()
        for seg in self.segments:
            seg.close()
            if seg.owner:
                seg.unlink()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
