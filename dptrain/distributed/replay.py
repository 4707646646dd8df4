"""Replay a distributed run in one process, bit for bit: `dptrain train --replay-workers N` (one host, as
`dptrain launch --workers N`) or `--replay-layout HxS` (H hosts of S workers, as `launch -H a:S,b:S`).

Floating-point sums depend on how they are grouped, so a run on N workers is not bitwise a run on one process (they
agree to rounding at first, then part ways like any two float32 trainings). This executor makes the same sums in the
same groups as the distributed run, so a surprise seen on 8 workers can be stepped through in one debugger:
  - the same shards (executor.split_by_slots), one Model per rank over the run's weights with its own gradient row,
    each computing its shard with the BLAS threads its worker had (session.blas_threads: GEMM bits depend on it);
  - SyncBatchNorm: the ranks' shards run in threads of their own, one at a time in rank order (`Baton`); each BN
    reduction sums the ranks' moments from zeros in rank order (per host, then the hosts in host order), as the
    coordinator (and an agent's local coordinator, and one host's workers in shared memory: localsum.py) does;
  - gradients summed in rank order (reduce.sum_in_order), per host first then in host order across hosts; the float16
    wire's encodings where the run had them (a rank's frame on socket transport, a host's frame on the star, the mesh's
    fixed pieces), and the float16-rounded weight update (wire.apply_update16);
  - the global norm's block sums with the BLAS threads of whoever computed them (the coordinator: 1; workers updating
    on one host: theirs; mesh agents: this process's default), BN moments, losses and counts summed in the same order.
Evaluations sum the ranks' losses in rank order too, so val_loss is bitwise as well. What it does not follow: a run
whose membership changed (a rank lost under `continue`, or replaced) replays bitwise up to the first such step.
"""
from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from .. import log
from ..compute import evaluate_batches, shard_gradient
from ..config import Config
from ..executors import StepResult
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import match_blas_threads
from ..optim import add_blocks, checked_clip, chunk_squares, clipped_step
from .executor import split_by_slots
from .hostfile import rank_bases
from .mesh_layout import dw_span, factor_span, factors_pay, gather_pieces, plane_slices, replicate_pays, scatter_pieces
from .reduce import Factors, one_host_factored, reduce_range, sum_in_order
from .session import blas_threads
from .wire import add16, apply_update16, encode16, grad_frame


@dataclass(frozen=True)
class Layout:
    """The coordinator's peers and their workers: (1,) * N on one host, (S,) * H across hosts."""
    slots: tuple[int, ...]
    hosts: bool

    @property
    def ranks(self) -> int:
        return sum(self.slots)

    def describe(self) -> str:
        if self.hosts:
            return f"{len(self.slots)} hosts x {self.slots[0]} workers"
        return f"{self.ranks} workers on one host"


def parse_layout(workers: int | None = None, layout: str | None = None) -> Layout | None:
    """--replay-workers N -> one host of N; --replay-layout HxS -> H hosts of S; neither -> None."""
    if layout:
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", layout)
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise ValueError(f"--replay-layout {layout!r}: expected HOSTSxSLOTS, e.g. 2x4")
        return Layout((int(m[2]),) * int(m[1]), True)
    if workers:
        if workers < 1:
            raise ValueError("--replay-workers must be >= 1")
        return Layout((1,) * workers, False)
    return None


def zero_sum(parts: list[np.ndarray]) -> np.ndarray:
    """zeros + parts[0] + parts[1] + ... in float64: the coordinator's sync-BN reduction, in the given order."""
    total = np.zeros(parts[0].shape, np.float64)
    for p in parts:
        total += p
    return total


def mesh_pieces(param_starts: list[int | None], size: int, slices: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The mesh's fixed pieces of the flat buffer (each float16-encoded with a scale of its own), as its agents cut
    them (mesh_layout.scatter_pieces) for a plane of len(slices) hosts."""
    owners = [(h, lo, hi) for h, (lo, hi) in enumerate(slices)]
    return [(a, b) for a, b, _ in scatter_pieces(param_starts, size, owners)]


_blas_now = 0  # the BLAS thread limit last set here (process-wide, whichever executor set it)
_default = 1


def _default_threads() -> int:
    global _default
    if _blas_now == 0:  # not limited by an executor of ours: what a fresh process gets
        _default = min((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=1)
    return _default


def _blas(n: int) -> None:
    global _blas_now
    if n != _blas_now:
        threadpool_limits(n, user_api="blas")
        _blas_now = n


class Baton:
    """Runs one job per rank, each in a thread of its own but one at a time, in rank order. A job hands over at
    `allreduce` (its model's SyncBatchNorm hook): the last rank sums what every rank left there and the first takes
    over again. Jobs that never call it simply run one after the other."""

    def __init__(self, reduce):
        self.reduce = reduce  # {rank: local array} -> the total every rank gets back
        self.cv = threading.Condition()

    def run(self, jobs: dict[int, callable]) -> dict:
        self.order = sorted(jobs)
        self.pos = {r: i for i, r in enumerate(self.order)}
        self.turn, self.error, self.left, self.total = 0, None, {}, None
        out: dict = {}

        def body(rank):
            i = self.pos[rank]
            try:
                self._wait(i)
                out[rank] = jobs[rank]()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = self.error or e
            finally:
                self._hand(i + 1)
        threads = [threading.Thread(target=body, args=(r,), name=f"replay-rank{r}", daemon=True) for r in self.order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error
        return out

    def allreduce(self, rank: int, local: np.ndarray) -> np.ndarray:
        i = self.pos[rank]
        self.left[rank] = np.array(local, np.float64)
        if i == len(self.order) - 1:
            self.total, self.left = self.reduce(self.left), {}
        self._hand((i + 1) % len(self.order))
        self._wait(i)
        return self.total.copy()

    def _hand(self, i: int) -> None:
        with self.cv:
            self.turn = i
            self.cv.notify_all()

    def _wait(self, i: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i or self.error is not None)
        if self.error is not None:
            raise RuntimeError("another rank's shard failed")


class ReplayExecutor:
    """executors.Executor: each step computed as the distributed run with `layout` and this config's dist settings."""

    def __init__(self, cfg: Config, model, dataset, store: ParamStore, opt, layout: Layout,
                 membership: dict[int, list[int]] | None = None):
        self.cfg, self.ds, self.store, self.opt, self.layout = cfg, dataset, store, opt, layout
        self.membership = membership or {}  # step -> the ranks that computed it (one host, after a loss)
        self.last_step = -1
        if self.membership and layout.hosts:
            raise ValueError("--replay-membership follows one-host runs (--replay-workers) only")
        bad = {s: rs for s, rs in self.membership.items() if not rs or not set(rs) <= set(range(layout.ranks))}
        if bad:
            s = min(bad)
            raise ValueError(f"step {s} was computed by ranks {bad[s]}: not of a {layout.ranks}-worker run")
        d = cfg.dist
        self.default_threads = _default_threads()  # an agent's (nothing limits its BLAS)
        self.threads = blas_threads(cfg, layout.slots[0] if layout.hosts else layout.ranks)  # a worker's, on its host
        self.limits = threadpool_limits(self.threads, user_api="blas")
        _blas(self.threads)
        match_blas_threads(cfg.train.short_blas_spin)
        self.bases = rank_bases(list(layout.slots))
        self.host_of = [h for h, n in enumerate(layout.slots) for _ in range(n)]
        P = store.num_params
        self.grad_slots = np.zeros((layout.ranks, P), np.float32)
        self.baton = Baton(self._bn_sum)
        self.models = []
        for r in range(layout.ranks):
            s = ParamStore(np.float32)
            m = build_model(cfg.model, len(dataset.class_names), cfg.data.image_size, s)
            s.rebind(store.params, self.grad_slots[r], store.buffers, copy=False)
            if d.bn == "sync":
                m.set_bn_allreduce(lambda local, r=r: self.baton.allreduce(r, local))
            self.models.append(m)
        self.plane = d.plane if layout.hosts else "one host"
        self.wire16 = d.wire_dtype == "float16" and (layout.hosts or d.transport == "socket")
        # weights go down as float16-rounded updates (socket transport, the star) or per mesh piece
        self.prev = np.empty_like(store.params) if self.wire16 else None
        self.out16 = np.empty(P, np.float16) if self.wire16 else None
        if self.wire16:
            np.copyto(self.prev, store.params)
        self.host_sum = np.empty(P, np.float32) if layout.hosts else None
        self.factor = None  # mesh, dist.factored: (offset, K, F) of the Linear whose dW owners compute as X^T dY
        self.factor_layers = [m.factor_layer() for m in self.models]  # each rank's (its x, dy after backward)
        w = self.factor_layers[0].w if self.factor_layers[0] is not None else None
        if layout.hosts and d.plane == "mesh" and d.factored and w is not None and \
                factors_pay(cfg.train.batch_size, len(layout.slots), *w.shape):
            for layer in self.factor_layers:
                layer.factored = True
            self.factor = (w.offset, *w.shape)
        # one host, dist.factored: the workers' reduction computes that Linear's dW from every rank's factors
        self.local_factor = not layout.hosts and one_host_factored(cfg, self.models[0], layout.ranks) is not None
        if self.local_factor:
            for layer in self.factor_layers:
                layer.factored = True
        if layout.hosts and d.plane == "mesh":
            # the plane's slices as its coordinator cuts them (mesh_plane.MeshPlane.ensure): even in the other
            # parameters where every host updates the factored Linear itself (the owners' GEMMs follow the slices)
            replicated = self.factor is not None and replicate_pays(
                cfg.train.batch_size, len(layout.slots), self.factor[1], self.factor[2],
                2 if self.wire16 else 4, d.factor_update)
            self.slices = plane_slices(P, len(layout.slots), (w.offset, w.offset + w.size) if replicated else None)
            self.replicated = replicated  # its weights never travel: not rounded to the float16 wire
            cuts = list(model.param_starts) + ([w.offset, w.offset + w.size] if self.factor else [])
            self.pieces = mesh_pieces(cuts, P, self.slices) if self.wire16 else []
            self.decoded = np.empty((len(layout.slots), P), np.float32) if self.wire16 else None
        update = ("the workers" if d.transport == "shm" and d.update == "workers" else "the coordinator") \
            if not layout.hosts else ("the hosts (mesh)" if d.plane == "mesh" else "the coordinator (star)")
        log.get().info(f"replay of {layout.describe()}: {self.threads} BLAS thread(s) per rank, bn={d.bn}, "
                       f"wire {d.wire_dtype if (layout.hosts or d.transport == 'socket') else 'shm'}, update by "
                       f"{update}")

    # ---- sums, in the distributed run's order -------------------------------------------------------------------
    def _by_host(self, ranks) -> list[list[int]]:
        return [[r for r in ranks if self.host_of[r] == h] for h in range(len(self.layout.slots))]

    def _bn_sum(self, got: dict[int, np.ndarray]) -> np.ndarray:
        ranks = sorted(got)
        if not self.layout.hosts:
            return zero_sum([got[r] for r in ranks])
        return zero_sum([zero_sum([got[r] for r in rs]) for rs in self._by_host(ranks) if rs])

    def _shards(self, indices: np.ndarray, step: int) -> dict[int, np.ndarray]:
        live = self.membership.get(step)
        if live is not None:  # the survivors re-sharded the step (one host: one rank a peer)
            blocks, _ = split_by_slots(indices, [1] * len(live))
            return {r: b for r, b in zip(sorted(live), blocks) if len(b)}
        blocks, sizes = split_by_slots(indices, list(self.layout.slots))
        out = {}
        for block, base, ns in zip(blocks, self.bases, sizes):
            at = 0
            for j, n in enumerate(ns):
                if n:
                    out[base + j] = block[at:at + n]
                at += n
        return out

    # ---- the executor contract ---------------------------------------------------------------------------------
    def train_step(self, indices: np.ndarray, epoch: int, step: int, lr: float) -> StepResult:
        shards = self._shards(indices, step)
        self.last_step = step
        _blas(self.threads)

        def job(r):
            res = shard_gradient(self.models[r], self.ds.images, self.ds.labels, shards[r], epoch=epoch,
                                 global_count=len(indices), data=self.cfg.data, seed=self.cfg.train.seed,
                                 smoothing=self.cfg.train.label_smoothing)
            return res.loss_sum, res.correct, self.models[r].bn_moments()
        got = self.baton.run({r: (lambda r=r: job(r)) for r in shards})
        ranks = sorted(got)
        if self.layout.hosts:  # each agent sums its workers' results, the coordinator the hosts' in host order
            hosts = [rs for rs in self._by_host(ranks) if rs]
            losses = [sum(got[r][0] for r in rs) for rs in hosts]
            corrects = [sum(got[r][1] for r in rs) for rs in hosts]
            moments = [sum(np.asarray(got[r][2], np.float64) for r in rs) for rs in hosts]
        else:
            losses, corrects, moments = ([got[r][k] for r in ranks] for k in range(3))
        norm = self._update(ranks, step, lr)
        return StepResult(len(indices), sum(losses), sum(corrects), sum(np.asarray(m, np.float64) for m in moments),
                          norm)

    def _update(self, ranks: list[int], step: int, lr: float) -> float:
        d, g = self.cfg.dist, self.store.grads
        if not self.layout.hosts:  # one host: the ranks' gradients (their frames on socket transport)
            frames = [grad_frame(self.grad_slots[r], "float16" if self.wire16 else "float32") for r in ranks]
            factors = None
            if self.local_factor:  # every rank's (x, dy) of the factored Linear, in rank order
                layers = [self.factor_layers[r] for r in ranks]
                w = layers[0].w
                factors = Factors(w.offset, *w.shape, [m.factors[0] for m in layers], [m.factors[1] for m in layers])
            reduce_range(g, [f for f, _ in frames], 0, g.size, [s for _, s in frames], factors)
            return self._coordinator_step(lr, step, self.threads if d.transport == "shm" and d.update == "workers"
                                          else 1)
        sums = []
        for rs in self._by_host(ranks):
            if not rs and d.plane == "star":  # a host with no image sits the round out
                continue
            h = len(sums)
            if rs:
                sum_in_order(self.host_sum, [self.grad_slots[r] for r in rs])  # local rank order
            else:  # mesh: it contributes zeros
                self.host_sum.fill(0.0)
            if d.plane == "star":
                f, s = grad_frame(self.host_sum, d.wire_dtype)
                sums.append((f.copy(), s))
            elif self.wire16:  # mesh: each fixed piece encoded with its own scale, decoded by its owner
                for lo, hi in self.pieces:
                    part, s = encode16(self.host_sum[lo:hi])
                    add16(self.decoded[h, lo:hi], part, s, first=True)
                sums.append((self.decoded[h], 1.0))
            else:
                sums.append((self.host_sum.copy(), 1.0))
        sum_in_order(g, [f for f, _ in sums], [s for _, s in sums])  # host order
        if d.plane == "star":
            return self._coordinator_step(lr, step, 1)
        _blas(self.default_threads)  # the agents' block sums of squares, with their own BLAS threads
        if self.factor is not None:
            self._factored_rows(ranks, g)
        norm = math.sqrt(add_blocks(chunk_squares(g)))
        self.opt.step(self.store.params, g, lr, checked_clip(norm, self.cfg.train.clip_norm, step))
        if self.wire16:  # every owner's new weights travel as float16-rounded updates, piece by piece
            cuts = (self.factor[0], self.factor[0] + self.factor[1] * self.factor[2]) if self.factor else ()
            for lo, hi in self.slices:
                for a, b in gather_pieces(lo, hi, cuts):
                    if self.replicated and cuts[0] <= a < cuts[1]:
                        continue  # the replicated layer: every host's own float32 update (mesh.update_gather)
                    apply_update16(self.store.params[a:b], self.prev[a:b], self.out16[a:b])
        return norm

    def _factored_rows(self, ranks: list[int], g: np.ndarray) -> None:
        """The owners' rows of the factored Linear's weight gradient (mesh.MeshReplica._factored_rows): X^T dY over
        every rank's samples in rank order, one GEMM per owner's rows, the columns of X it was sent."""
        w0, K, F = self.factor
        x_all = np.concatenate([self.factor_layers[r].factors[0] for r in ranks])
        dy_all = np.concatenate([self.factor_layers[r].factors[1] for r in ranks])
        for lo, hi in self.slices:
            span = factor_span(w0, K, F, lo, hi)
            if span is not None:
                a, b, k0, k1 = span
                g[a:b] = dw_span(np.ascontiguousarray(x_all[:, k0:k1]), dy_all, w0, F, span)

    def _coordinator_step(self, lr: float, step: int, threads: int) -> float:
        _blas(threads)
        norm = clipped_step(self.opt, self.store.params, self.store.grads, lr, self.cfg.train.clip_norm, step)
        if self.wire16:
            apply_update16(self.store.params, self.prev, self.out16)
        return norm

    def evaluate(self, indices: np.ndarray, weights_replaced: bool = False) -> tuple[float, int]:
        """Each rank evaluates its shard in batches of its training shard's size (or train.eval_batch_size); the
        sums go in rank order, as the distributed run's do."""
        _blas(self.threads)
        live = self.membership.get(self.last_step)  # an evaluation runs on the ranks of the step before it
        per_worker = -(-self.cfg.train.batch_size // (len(live) if live else self.layout.ranks))
        batch = self.cfg.train.eval_batch_size or per_worker
        shards = self._shards(indices, self.last_step)
        got = {r: evaluate_batches(self.models[r], self.ds.images, self.ds.labels, idx, batch)[:2]
               for r, idx in shards.items()}
        groups = self._by_host(sorted(got)) if self.layout.hosts else [[r] for r in sorted(got)]
        groups = [rs for rs in groups if rs]
        return (sum(sum(got[r][0] for r in rs) for rs in groups), sum(sum(got[r][1] for r in rs) for rs in groups))

    def request_stop(self, grace_s: float) -> None:
        pass  # a step runs to its end

    def settle(self) -> int:
        return 0

    def summary(self) -> dict:
        return {"replay": self.layout.describe()}

    def close(self) -> None:
        global _blas_now
        self.limits.restore_original_limits()
        _blas_now = 0


def replay_executor(layout: Layout, membership: dict[int, list[int]] | None = None):
    """train.run_local's executor factory for `layout` (and the run's membership changes, `read_membership`)."""
    return lambda cfg, model, dataset, store, opt: ReplayExecutor(cfg, model, dataset, store, opt, layout,
                                                                  membership)


def read_membership(path: str | Path) -> dict[int, list[int]]:
    """{step: ranks} of the steps a one-host run computed on fewer than all its workers: the `ranks` of its
    metrics.jsonl step lines (a run folder or the file itself; a resumed run's later line for a step wins)."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    out: dict[int, list[int]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--replay-membership: cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"--replay-membership: {path}:{n}: not a JSON line") from None
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            if "ranks" in rec:
                out[int(rec["step"])] = [int(r) for r in rec["ranks"]]
            else:
                out.pop(int(rec["step"]), None)
    return out
