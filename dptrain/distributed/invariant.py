"""Batch-invariant training (`train.batch_invariant_block = B`, `--batch-invariant B`): the weights do not depend on
how many processes computed them. One process, `launch --workers 2` and `--workers 4` (`--bn sync`) give bitwise
the same weights, momentum, BN buffers and per-step losses.

Why ordinary data parallelism is not: float sums depend on their grouping (a shard's GEMM contracts over its own
samples, the ranks' gradients are summed N at a time, BN moments likewise), so different N differ in the last bits
and then part ways. Here nothing that is summed depends on N:
  - **Blocks.** A global batch is cut into blocks of B samples in batch order (the last one shorter, the same for
    every N); a rank gets whole, contiguous blocks (`split_blocks`: counts differ by at most one block), and runs
    forward/backward block by block, each block on a Model of its own. Every GEMM has a block's shape whatever N,
    and BLAS runs on one thread (GEMM and dot bits may depend on the thread count); a process's cores go to
    blocks computed concurrently instead (`BlockRunner`, one thread per core, each with one BLAS thread).
  - **Gradients, exactly.** Each block's float32 gradient is rounded to a fixed-point int64 with a fixed quantum
    2**-GRAD_FRAC_BITS, truncated toward zero (|g| up to GRAD_LIMIT per block and element; beyond, it saturates and says so) and the
    blocks', then the ranks', integers are added: integer sums are associative, so any grouping gives the same
    bits. The reduced sum is rounded to float32 once (`decode_grads`). On one host the gradient slots in shared
    memory are int64 (twice the bytes of float32), over sockets the frames are.
  - **SyncBatchNorm moments, exactly.** A block's float64 `[count, Σx, Σx²]` (forward) and `[Σdy, Σdy·x̂]`
    (backward) are split into LIMBS float64 integers of 40 bits each at fixed binary scales (`encode_limbs`):
    sums of fewer than 2**13 of them stay below 2**53, so the existing float64 all-reduce (in any order) adds them
    exactly; every rank decodes the same total. The running statistics come from the global moments.
  - Per-step loss: each block's loss rounded to a multiple of 2**-32, summed exactly in float64.
  - The global norm and SGD: float32 on one BLAS thread over the same reduced gradient (coordinator, workers' slices
    or the single process: the same block sums of squares).

Not invariant, refused: `--bn stats` (each worker normalises with its own shard: a different function of N by
design), the float16 wire, multi-host runs. The quantisation makes the mathematics differ from the normal mode by
~2**-40 absolute per block and element (far below a float32 weight's ulp); the normal mode and this one are not
bitwise equal to each other.
"""
from __future__ import annotations

import math
import threading
import time
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from .. import log
from ..compute import shard_gradient
from ..data.sampler import shard_bounds
from ..executors import LocalExecutor, StepResult
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import set_threads
from ..optim import CHUNK, clipped_step

GRAD_FRAC_BITS = 40  # gradient quantum 2**-40 (~9e-13)
_QSCALE = np.float32(2.0 ** GRAD_FRAC_BITS)
_QINV = 2.0 ** -GRAD_FRAC_BITS
MAX_BLOCKS = 1 << 12  # blocks per global batch: their int64 sum cannot overflow
GRAD_LIMIT = 2.0 ** (62 - 12 - GRAD_FRAC_BITS)  # |g| per block and element (1024): beyond, it saturates
_QLIMIT = np.float32(GRAD_LIMIT * 2.0 ** GRAD_FRAC_BITS)
LIMB_EXPS = (24, -16, -56, -96)  # float64 limbs of 40 bits: values up to 2**63, quantum 2**-96
LIMBS = len(LIMB_EXPS)
LOSS_QUANTUM = 2.0 ** -32


def enabled(cfg) -> int:
    """The block size B (0: the normal mode)."""
    return cfg.train.batch_invariant_block


def check_launch(cfg, many_hosts: bool) -> None:
    """Refuse the distributed settings under which the result cannot be independent of N (SystemExit)."""
    if not enabled(cfg) or (cfg.dist.workers == 0 and not many_hosts):
        return
    if cfg.dist.bn != "sync":
        raise SystemExit("dptrain launch: --batch-invariant needs --bn sync (with --bn stats each worker normalises "
                         "with its own shard's statistics: the result depends on N by design)")
    if many_hosts:
        raise SystemExit("dptrain launch: --batch-invariant runs on one host (launch --workers N) or in one process")


# ---- blocks and shards ---------------------------------------------------------------------------------------------
def blocks_of(indices: np.ndarray, block: int) -> list[np.ndarray]:
    """Consecutive blocks of `block` samples (the last one may be shorter)."""
    return [indices[lo:lo + block] for lo in range(0, len(indices), block)]


def split_blocks(indices: np.ndarray, slots: list[int], block: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """executor.split_by_slots on block boundaries: the global batch's blocks go to sum(slots) ranks, whole and in
    order (counts differ by at most one block); returns each peer's contiguous part and its ranks' shard sizes."""
    nb = -(-len(indices) // block)
    total, out, sizes, base = sum(slots), [], [], 0
    for n in slots:
        cuts = [shard_bounds(nb, r, total) for r in range(base, base + n)]
        bounds = [(min(a * block, len(indices)), min(b * block, len(indices))) for a, b in cuts]
        out.append(indices[bounds[0][0]:bounds[-1][1]])
        sizes.append([b - a for a, b in bounds])
        base += n
    return out, sizes


# ---- exact sums ----------------------------------------------------------------------------------------------------
def encode_limbs(v: np.ndarray) -> np.ndarray:
    """float64 (n,) -> (LIMBS * n,) float64 integers (|limb| <= 2**40) with v ~= Σ limb_i * 2**LIMB_EXPS[i]
    (exact down to 2**-96): sums of fewer than 2**13 encodings are exact in float64 in any order."""
    r = np.array(v, np.float64)
    if not np.all(np.abs(r) < 2.0 ** 63):
        raise FloatingPointError(f"batch-invariant: a BatchNorm sum is {np.abs(r).max()} (non-finite or >= 2**63)")
    out = np.empty((LIMBS, r.size), np.float64)
    for i, e in enumerate(LIMB_EXPS):
        np.rint(r * 2.0 ** -e, out=out[i])
        r -= out[i] * 2.0 ** e  # exact: out[i] * 2**e is r rounded to a multiple of 2**e
    return out.reshape(-1)


def decode_limbs(enc: np.ndarray) -> np.ndarray:
    limbs = np.asarray(enc, np.float64).reshape(LIMBS, -1)
    total = limbs[0] * 2.0 ** LIMB_EXPS[0]
    for i in range(1, LIMBS):
        total = total + limbs[i] * 2.0 ** LIMB_EXPS[i]
    return total


def quantize_loss(loss_sum: float) -> float:
    """A block's loss rounded to a multiple of 2**-32: sums of them are exact in float64 below 2**21."""
    return round(loss_sum / LOSS_QUANTUM) * LOSS_QUANTUM


class Quantizer:
    """Adds float32 gradients to an int64 accumulator at the fixed quantum, chunk by chunk (in cache)."""

    def __init__(self):
        self.t32 = np.empty(CHUNK, np.float32)
        self.q = np.empty(CHUNK, np.int64)
        self.saturated = 0

    def add(self, acc: np.ndarray, g: np.ndarray, lo: int = 0, hi: int | None = None, first: bool = False) -> None:
        """acc[lo:hi] += g[lo:hi] at the quantum, truncated toward zero (first: acc[lo:hi] = ...)."""
        hi = g.size if hi is None else hi
        for a in range(lo, hi, CHUNK):
            b = min(a + CHUNK, hi)
            t, q = self.t32[:b - a], self.q[:b - a]
            np.multiply(g[a:b], _QSCALE, out=t)  # exact: a power of two
            top, bottom = float(t.max()), float(t.min())
            if not (math.isfinite(top) and math.isfinite(bottom)):
                raise FloatingPointError("batch-invariant: non-finite gradient (loss diverged; lower --lr)")
            if top > _QLIMIT or bottom < -_QLIMIT:
                np.clip(t, -_QLIMIT, _QLIMIT, out=t)
                self.saturated += 1
            if first:
                np.copyto(acc[a:b], t, casting="unsafe")  # truncation toward zero: a fixed function of g
            else:
                np.copyto(q, t, casting="unsafe")
                np.add(acc[a:b], q, out=acc[a:b])


def decode_grads(out: np.ndarray, parts: list[np.ndarray], lo: int = 0, hi: int | None = None) -> None:
    """out[lo:hi] (float32) = Σ parts[lo:hi] (int64; exact, any order) at the quantum, rounded once."""
    hi = out.size if hi is None else hi
    t = np.empty(min(CHUNK, max(hi - lo, 1)), np.int64)
    for a in range(lo, hi, CHUNK):
        b = min(a + CHUNK, hi)
        s = t[:b - a]
        np.copyto(s, parts[0][a:b])
        for p in parts[1:]:
            np.add(s, p[a:b], out=s)
        np.multiply(s, _QINV, out=out[a:b], casting="unsafe")


# ---- the blocks of one process -------------------------------------------------------------------------------------
class BlockResult(NamedTuple):
    loss_sum: float  # exact sum of the blocks' quantised losses
    correct: int
    moments: np.ndarray  # the GLOBAL BN moments (float64, Model.bn_moments layout); empty without BN
    timings: dict


class _Rendezvous:
    """The blocks' SyncBatchNorm hook: every block deposits its moments; the last one sums the encodings (block
    order, exact anyway), hands them to the cross-rank all-reduce and everyone gets the decoded total. A block gives
    its compute token back while it waits."""

    def __init__(self, n: int, reduce, tokens: threading.Semaphore):
        self.n, self.reduce, self.tokens = n, reduce, tokens
        self.cv = threading.Condition()
        self.left: dict[int, np.ndarray] = {}
        self.gen, self.total, self.error = 0, None, None

    def fail(self, e: BaseException) -> None:
        with self.cv:
            self.error = self.error or e
            self.cv.notify_all()

    def allreduce(self, k: int, local: np.ndarray) -> np.ndarray:
        self.tokens.release()
        try:
            with self.cv:
                gen = self.gen
                self.left[k] = np.array(local, np.float64)
                if len(self.left) == self.n:
                    parts, self.left = self.left, {}
                    try:
                        self.total = self.reduce(parts)
                    except BaseException as e:  # noqa: BLE001 - every block raises it
                        self.error = self.error or e
                    self.gen += 1
                    self.cv.notify_all()
                else:
                    self.cv.wait_for(lambda: self.gen != gen or self.error is not None)
                if self.error is not None:
                    raise _Aborted()
                total = self.total
        finally:
            self.tokens.acquire()
        return total.copy()


class _Aborted(Exception):
    """Another block failed (its exception is the one raised)."""


class BlockRunner:
    """Forward/backward of a shard block by block: one Model per block over the same weights, each with a gradient
    row of its own; `threads` blocks compute at once (one BLAS thread each); the rows are then added to an int64
    accumulator. Every block computes the same bits whichever process runs it."""

    def __init__(self, cfg, num_classes: int, threads: int = 1):
        self.cfg, self.num_classes = cfg, num_classes
        self.block = cfg.train.batch_invariant_block
        self.threads = max(1, threads)
        self.models, self.rows, self.bound = [], None, None
        self.quant = [Quantizer() for _ in range(self.threads)]

    @property
    def saturated(self) -> int:
        return sum(q.saturated for q in self.quant)

    def _models(self, k: int, params: np.ndarray, buffers: np.ndarray) -> list:
        P = params.size
        if self.rows is None or len(self.rows) < k:
            self.rows = np.zeros((k, P), np.float32)
            self.bound = None
        while len(self.models) < k:
            s = ParamStore(np.float32)
            self.models.append(build_model(self.cfg.model, self.num_classes, self.cfg.data.image_size, s))
        if self.bound != (id(params), id(buffers), len(self.rows)):  # new weights arrays: every model views them
            for j, m in enumerate(self.models):
                m.store.rebind(params, self.rows[j], buffers, copy=False)
            self.bound = (id(params), id(buffers), len(self.rows))
        return self.models[:k]

    def run(self, params: np.ndarray, buffers: np.ndarray, images, labels, indices: np.ndarray, *, epoch: int,
            global_count: int, acc: np.ndarray, allreduce=None) -> BlockResult:
        """Σ over the shard's blocks of their gradients into acc (int64, overwritten). `allreduce(encoded)`: the
        cross-rank float64 sum of limb encodings (None: this process has the whole batch)."""
        t0 = time.time()
        blocks = blocks_of(indices, self.block)
        models = self._models(len(blocks), params, buffers)
        n_bn = len(models[0].bn_layers)
        fwd: list[np.ndarray] = []

        def reduce(parts: dict[int, np.ndarray]) -> np.ndarray:
            enc = sum(encode_limbs(parts[k]) for k in sorted(parts))
            if allreduce is not None:
                enc = allreduce(enc)
            total = decode_limbs(enc)
            if len(fwd) < n_bn:
                fwd.append(total)
            return total

        tokens = threading.Semaphore(self.threads)
        rv = _Rendezvous(len(blocks), reduce, tokens)
        for k, m in enumerate(models):
            m.set_bn_allreduce(lambda local, k=k: rv.allreduce(k, local))
        out: dict[int, tuple[float, int]] = {}

        def job(k: int) -> None:
            tokens.acquire()
            try:
                r = shard_gradient(models[k], images, labels, blocks[k], epoch=epoch, global_count=global_count,
                                   data=self.cfg.data, seed=self.cfg.train.seed,
                                   smoothing=self.cfg.train.label_smoothing)
                out[k] = (quantize_loss(r.loss_sum), r.correct)
            except BaseException as e:  # noqa: BLE001 - re-raised by run()
                rv.fail(e)
            finally:
                tokens.release()
        self._parallel([lambda k=k: job(k) for k in range(len(blocks))])
        if rv.error is not None:
            raise rv.error
        t1 = time.time()
        P = params.size
        cuts = [(P * i // self.threads // CHUNK * CHUNK, P * (i + 1) // self.threads // CHUNK * CHUNK)
                for i in range(self.threads)]
        cuts[-1] = (cuts[-1][0], P)

        def quantize(i: int) -> None:
            lo, hi = cuts[i]
            for k in range(len(blocks)):
                self.quant[i].add(acc, self.rows[k], lo, hi, first=k == 0)
        self._parallel([lambda i=i: quantize(i) for i in range(self.threads)], raise_first=True)
        t2 = time.time()
        loss = 0.0
        for k in range(len(blocks)):
            loss += out[k][0]
        moments = np.concatenate(fwd) if fwd else np.zeros(0)
        return BlockResult(loss, sum(c for _, c in out.values()), moments,
                           {"load": [t0, 0.0], "forward": [t0, 0.0], "backward": [t0, t1 - t0],
                            "quantize": [t1, t2 - t1]})

    @staticmethod
    def _parallel(jobs: list, raise_first: bool = False) -> None:
        errors: list[BaseException] = []

        def body(fn):
            try:
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        if len(jobs) == 1:
            body(jobs[0])
        else:
            threads = [threading.Thread(target=body, args=(fn,), daemon=True) for fn in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if raise_first and errors:
            raise errors[0]


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info
    return min((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=1)


def _one_blas_thread() -> tuple[int, threadpool_limits]:
    """(the BLAS threads this process had, the limit to one thread, to restore): GEMM and dot bits may depend on
    the thread count, so every block computes on one; the process's threads become concurrent blocks."""
    n = _blas_threads()
    limits = threadpool_limits(1, user_api="blas")
    set_threads(1)
    return n, limits


def worker_runner(cfg, num_classes: int, num_params: int) -> BlockRunner:
    """A worker's BlockRunner (its BLAS threads become concurrent blocks), with an int64 accumulator for frames."""
    n, _ = _one_blas_thread()
    runner = BlockRunner(cfg, num_classes, n)
    runner.acc = np.zeros(num_params, np.int64)
    return runner


# ---- the single process ------------------------------------------------------------------------------------------
class InvariantExecutor(LocalExecutor):
    """executors.Executor: the whole global batch in this process, block by block (bitwise `launch --workers N` in
    this mode, for any N); evaluation, stop and settle are LocalExecutor's."""

    def __init__(self, cfg, model, dataset, store: ParamStore, opt):  # not LocalExecutor's: one BLAS thread a block
        self.cfg, self.model, self.ds, self.store, self.opt = cfg, model, dataset, store, opt
        cores, self.limits = _one_blas_thread()
        self.runner = BlockRunner(cfg, len(dataset.class_names), cores)
        self.acc = np.zeros(store.num_params, np.int64)
        log.get().info(f"batch-invariant: blocks of {cfg.train.batch_invariant_block}, {self.runner.threads} at "
                       f"once, one BLAS thread each")

    def train_step(self, indices: np.ndarray, epoch: int, step: int, lr: float):
        r = self.runner.run(self.store.params, self.store.buffers, self.ds.images, self.ds.labels, indices,
                            epoch=epoch, global_count=len(indices), acc=self.acc)
        decode_grads(self.store.grads, [self.acc])
        norm = clipped_step(self.opt, self.store.params, self.store.grads, lr, self.cfg.train.clip_norm, step)
        return StepResult(len(indices), r.loss_sum, r.correct, r.moments, norm)

    def summary(self) -> dict:
        return {"batch_invariant_block": self.cfg.train.batch_invariant_block,
                "saturated_chunks": self.runner.saturated}

    def close(self) -> None:
        self.limits.restore_original_limits()
