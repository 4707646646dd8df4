"""The distributed executor: the Trainer's `train_step` / `evaluate`, spread over the coordinator's workers.

Every global batch is split into contiguous shards over the live ranks (sizes differ by at most one); each worker
returns the gradient of its shard's share of the *global* mean loss (dlogits / global count), so the reduction is a
plain sum, done in rank order, never arrival order: the same inputs always give the same bits. Under the `continue`
policy a lost rank's step is re-sharded over the survivors and redone from the same weights: nothing is lost.
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np

from .. import log
from ..config import Config
from ..data.sampler import shard_bounds
from ..executors import StepInterrupted, StepResult
from ..nn.params import ParamStore
from ..optim import SGD, add_blocks, checked_clip, chunk_slices, clipped_step
from . import invariant, protocol as P
from .coordinator import Coordinator, StopTimeout, WorkerFailure
from .hostfile import rank_bases
from .mesh_plane import MeshPlane
from .peers import PeerState
from .reduce import Factors, reduce_range
from .timeline import Timeline, busy_s
from .wire import apply_update16


def split_by_slots(indices: np.ndarray, slots: list[int]) -> tuple[list[np.ndarray], list[list[int]]]:
    """Shard over sum(slots) worker ranks (sizes differ by at most one), then hand each peer the contiguous block
    of its ranks' shards and their sizes: an agent's workers get exactly the shards ranks would get one by one."""
    total, blocks, sizes = sum(slots), [], []
    for n, base in zip(slots, rank_bases(slots)):
        bounds = [shard_bounds(len(indices), r, total) for r in range(base, base + n)]
        blocks.append(indices[bounds[0][0]:bounds[-1][1]])
        sizes.append([b - a for a, b in bounds])
    return blocks, sizes


def train_fields(indices: np.ndarray, epoch: int) -> dict:
    """A training STEP's fields: its loss is the mean over the whole global batch."""
    return {"phase": "train", "epoch": epoch, "global_count": len(indices), "eval_batch": 0}


class SharedUpdate:
    """dist.update = "workers" on one host: the arrays the workers reduce and update in place of the coordinator.

    params and velocity are (2, P) double buffers: step k reads half `cur` and writes half 1 - cur, so a step that
    fails half-way leaves the weights it started from whole (it is redone from them, or they are checkpointed).
    gsum (P,) receives the reduced gradient (the rank slots it sums are the executor's grad_slots). With
    train.ema_epochs, `average` (the Trainer's WeightAverage) lives in the double buffer avg2 (2, P) and the workers
    blend each slice they update into it (ema.py); its `params` is pointed at the current half after every step."""

    def __init__(self, params2: np.ndarray, velocity2: np.ndarray, gsum: np.ndarray,
                 avg2: np.ndarray | None = None, average=None):
        self.params2, self.velocity2, self.gsum = params2, velocity2, gsum
        self.avg2, self.average = avg2, average
        self.cur = 0


class DistExecutor:
    """The Trainer's executor (executors.Executor) over a coordinator's peers. It reads and writes the store's flat
    buffers and the optimizer's velocity (the reduced gradient, the weights it publishes) and nothing else of the
    Trainer's. `grad_slots`: one host's shared gradient rows (None: gradients arrive as frames); `shared`: the
    double buffers when the workers reduce and update (dist.update = "workers"); `mesh`: the peers are host
    agents that reduce and update among themselves (dist.plane = "mesh", mesh_plane.py)."""

    def __init__(self, coord: Coordinator, store: ParamStore, opt: SGD, cfg: Config,
                 grad_slots: np.ndarray | None, shared: SharedUpdate | None = None, timeline: Timeline | None = None,
                 mesh: bool = False, factor_slots: tuple | None = None, local_bn: bool = False,
                 reducers: int | None = None):
        self.coord, self.store, self.opt, self.cfg = coord, store, opt, cfg
        # dist.update = "workers": at most this many of the workers (the first active ones) reduce and update, one
        # per physical core: more would only take turns on the cores, each woken for a smaller slice. Any number
        # gives the same bits (slices on CHUNK boundaries, every element summed in rank order)
        self.reducers = reducers
        self.local_bn = local_bn  # one host, --bn sync: STEP names the round's ranks, whose BN sums meet in shm
        self.grad_slots, self.shared = grad_slots, shared
        # one host, dist.factored: (w0, K, F, x slots, dy slots) of the Linear whose dW is summed from its factors
        self.factor_slots = factor_slots
        self.mesh = MeshPlane(coord, store, opt, cfg) if mesh else None
        # the workers keep train.ema's average (SharedUpdate.avg2): the Trainer leaves it to them
        self.averages = shared is not None and shared.avg2 is not None and not mesh
        self.policy = cfg.dist.on_worker_failure
        self.timeline = timeline
        self.version = 0
        self.log = log.get()
        self.phase_s = {"compute": 0.0, "round": 0.0, "reduce": 0.0, "update": 0.0, "serial": 0.0, "step": 0.0,
                        "steps": 0}
        self._t_end: float | None = None  # when the coordinator last stopped waiting on the workers
        # Weights over sockets with a float16 wire: after the first full copy, peers get the float16-rounded update
        # (wire.apply_update16 keeps the coordinator's weights equal to what the peers rebuild from it).
        self.update16 = grad_slots is None and cfg.dist.wire_dtype == "float16" and not mesh
        if self.update16:
            self.prev_params = store.params.copy()
            self.update_f16 = np.empty(store.num_params, np.float16)
            self.update_scale = 1.0

    # ---- rounds ------------------------------------------------------------------------------------------------
    def _retrying(self, step: int, body, attempt: int = 0):
        """body(attempt), redone over the survivors while the policy is `continue` and someone survives."""
        while True:
            try:
                return body(attempt)
            except StopTimeout as e:
                raise StepInterrupted(str(e)) from None
            except WorkerFailure as e:
                survivors = self.coord.active()
                if self.policy != "continue" or not survivors:
                    raise
                attempt += 1
                self.log.warning(f"step {step}: lost {', '.join(p.describe() for p in e.peers)}; redoing the step "
                                 f"on {len(survivors)} surviving rank(s)")
                if self.mesh is not None:
                    self._redo_unsettled()

    def _redo_unsettled(self) -> None:
        """Mesh, after a loss: the hosts' state comes in if every host answers; otherwise the steps since the last
        sync are redone over the survivors from the synced state (their results were already reported; the redo
        only rebuilds the state)."""
        if self.mesh.settle():
            return
        steps = self.mesh.unsynced()
        self.log.warning(f"steps {steps[0].step}..{steps[-1].step}: redoing them over the survivors from the state "
                         f"synced before them")
        for d in steps:
            fields = train_fields(d.indices, d.epoch)
            self._retrying(d.step, lambda attempt, d=d, fields=fields: self._mesh_step(
                d.indices, d.epoch, d.step, d.lr, attempt, fields), attempt=d.attempt + 1)
        if not self.mesh.settle():  # lost another host meanwhile: again, from what is left
            self._redo_unsettled()

    def _round(self, indices: np.ndarray, step: int, attempt: int, fields: dict, version: int | None = None
               ) -> tuple[list[int], dict]:
        """One STEP round. `version`: the weights' version with sockets (default self.version)."""
        peers = self.coord.active()
        if self.mesh is not None:  # a host that joined is in the plane (it has the weights) from its next forming
            peers = [p for p in peers if p.rank in self.mesh.formed]
        if not peers:
            raise WorkerFailure([])
        B = invariant.enabled(self.cfg) if fields["phase"] == "train" else 0
        blocks, sizes = invariant.split_blocks(indices, [p.slots for p in peers], B) if B else \
            split_by_slots(indices, [p.slots for p in peers])
        # fewer images than slots (a small batch, a short last batch, a tiny val set): a peer with no image sits
        # the round out; an empty shard would crash its worker (a batch of 0) and stall sync BN. On the mesh every
        # host takes part in a training step (its agent contributes zeros and still owns its slice).
        mesh_train = self.mesh is not None and fields["phase"] == "train"
        keep = [i for i, b in enumerate(blocks) if len(b) or mesh_train]
        ranks = [peers[i].rank for i in keep]
        shards = {peers[i].rank: blocks[i] for i in keep}
        shard_sizes = {peers[i].rank: sizes[i] for i in keep}
        weights = update = None
        if self.grad_slots is None and self.mesh is None:  # sockets; with shm the workers read them in place
            weights = {"params": self.store.params, "buffers": self.store.buffers}
            if self.update16 and self.version > 0:  # version 0: no update yet, everyone needs a full copy
                update = {"arrays": {"update": self.update_f16, "buffers": self.store.buffers},
                          "scale": self.update_scale}
        fields = fields | {"weights_slot": self.shared.cur if self.shared else -1}
        if self.local_bn and fields["phase"] == "train":  # whose rows each rank's shared-memory BN sums wait for
            fields["ranks"] = ranks
        arrays = side = None
        if self.mesh is not None:  # the hosts hold the weights; the BN statistics are the Trainer's
            arrays, side = {"buffers": self.store.buffers}, self.mesh.on_message
        self._serial_until_now()
        version = self.version if version is None else version
        results = self.coord.round(step, attempt, shards, fields, weights, version, update, shard_sizes,
                                   arrays=arrays, side=side)
        self._t_end = time.perf_counter()
        return ranks, results

    def _serial_until_now(self) -> None:
        """Time since the coordinator last heard back from every worker: nobody else was working."""
        if self._t_end is not None:
            self.phase_s["serial"] += time.perf_counter() - self._t_end

    # ---- the executor contract ---------------------------------------------------------------------------------
    def train_step(self, indices: np.ndarray, epoch: int, step: int, lr: float) -> StepResult:
        t0 = time.perf_counter()
        wall0 = time.time()
        fields = train_fields(indices, epoch)
        try:  # capacity coming back: a replacement for a lost peer, waited for; the shards are re-cut over all
            self.coord.replace_lost()
        except StopTimeout as e:
            raise StepInterrupted(str(e)) from None

        def attempt_step(attempt: int):
            if self.mesh is not None:
                return self._mesh_step(indices, epoch, step, lr, attempt, fields)
            ranks, results = self._round(indices, step, attempt, fields)
            t1 = time.perf_counter()
            if self.shared is not None:
                norm, t2 = self._update_by_workers(step, attempt, ranks, results, lr)
            else:
                parts = [self.grad_slots[r] if self.grad_slots is not None else results[r].arrays["grad"]
                         for r in ranks]
                if invariant.enabled(self.cfg):  # int64 block sums: exact in any order, rounded once
                    invariant.decode_grads(self.store.grads, parts)
                else:
                    reduce_range(self.store.grads, parts, 0, self.store.num_params,
                                 [float(results[r].fields["grad_scale"]) for r in ranks], self._factors(ranks, results))
                t2 = time.perf_counter()
                norm = clipped_step(self.opt, self.store.params, self.store.grads, lr, self.cfg.train.clip_norm, step)
                if self.update16:
                    self.update_scale = apply_update16(self.store.params, self.prev_params, self.update_f16)
            return ranks, results, norm, t1, t2

        ranks, results, norm, t1, t2 = self._retrying(step, attempt_step)
        moments = sum(np.asarray(results[r].arrays["bn_moments"], np.float64) for r in ranks
                      if "bn_moments" in results[r].arrays)
        if invariant.enabled(self.cfg):  # every rank reports the same exact global moments
            moments = np.asarray(results[ranks[0]].arrays["bn_moments"], np.float64)
        t3 = time.perf_counter()
        if self.shared is None and self.mesh is None:  # the coordinator did the bulk work itself: all of it was serial
            self.phase_s["serial"] += t3 - t1
            self._t_end = t3
        self.version += 1
        slowest = self._account(ranks, results, step, t0, wall0, t1, t2, t3)
        partial = self.mesh is None and self.coord.token is not None and len(ranks) < self.coord.world_size
        return StepResult(len(indices), sum(results[r].fields["loss_sum"] for r in ranks),
                          sum(results[r].fields["correct"] for r in ranks), moments, norm, slowest=f"rank {slowest}",
                          ranks=ranks if partial else None)  # metrics.jsonl: what a replay must follow

    def _factors(self, ranks: list[int], results: dict) -> Factors | None:
        """dist.factored on one host: every rank's factors of the hidden Linear, as many rows as its shard."""
        if self.factor_slots is None:
            return None
        return Factors.of_slots(self.factor_slots, ranks, [results[r].fields["count"] for r in ranks])

    def _mesh_step(self, indices: np.ndarray, epoch: int, step: int, lr: float, attempt: int, fields: dict):
        """The hosts reduce-scatter, the coordinator decides (norm -> clip), the hosts update and all-gather
        (mesh.py); every sync_every steps the hosts' state comes back (mesh_plane.py)."""
        self.mesh.ensure(step, attempt)
        ranks, results = self._round(indices, step, attempt, fields)
        t1 = time.perf_counter()
        norm = self.mesh.decide(step, attempt, results, lr, indices, epoch)
        return ranks, results, norm, t1, time.perf_counter()

    def _update_by_workers(self, step: int, attempt: int, ranks: list[int], results: dict,
                           lr: float) -> tuple[float, float]:
        """Reduce-scatter, exact global norm, clip + SGD, all by the workers on slices of the shared buffers;
        the coordinator decides (norm -> clip factor) and flips the double buffer. Returns (norm, reduce end)."""
        sh = self.shared
        peers = [p.rank for p in self.coord.active()][:self.reducers]
        slices = dict(zip(peers, chunk_slices(self.store.num_params, len(peers))))
        self._serial_until_now()
        counts = {"counts": [results[r].fields["count"] for r in ranks]} if self.factor_slots else {}
        got = self.coord.exchange(P.Kind.REDUCE, P.Kind.REDUCED, step, attempt,
                                  {r: {"lo": lo, "hi": hi, "ranks": ranks, **counts} for r, (lo, hi) in slices.items()})
        t_reduced = self._t_end = time.perf_counter()
        squares = np.concatenate([got[r].arrays["squares"] for r in peers])  # slice order = block order
        norm = math.sqrt(add_blocks(squares))
        scale = checked_clip(norm, self.cfg.train.clip_norm, step)
        self._serial_until_now()
        ema = {"ema_rate": float(sh.average.rate)} if self.averages else {}
        self.coord.exchange(P.Kind.UPDATE, P.Kind.UPDATED, step, attempt,
                            {r: {"lo": lo, "hi": hi, "lr": lr, "scale": scale, "src": sh.cur, **ema}
                             for r, (lo, hi) in slices.items()})
        self._t_end = time.perf_counter()
        sh.cur = 1 - sh.cur  # the step is whole: its weights (and their average) become the current ones
        self.store.rebind(sh.params2[sh.cur], sh.gsum, self.store.buffers, copy=False)
        self.opt.velocity = sh.velocity2[sh.cur]
        if self.averages:
            sh.average.params = sh.avg2[sh.cur]
        return norm, t_reduced

    def _account(self, ranks, results, step, t0, wall0, t1, t2, t3) -> int:
        """Per-phase seconds and timeline events of one step; returns the slowest rank."""
        compute = 0.0
        slowest, slowest_s = ranks[0], -1.0
        for rank in ranks:
            tm = results[rank].fields["timings"]
            busy = busy_s(tm)
            compute = max(compute, busy)
            if busy > slowest_s:
                slowest, slowest_s = rank, busy
            if self.timeline:
                for name, (start, dur) in tm.items():
                    self.timeline.add(name, rank, start, dur, step)
                if "backward" not in tm:  # a host with no image this step
                    continue
                end_backward = tm["backward"][0] + tm["backward"][1]
                self.timeline.add("send", rank, end_backward, results[rank].fields["sent_at"] - end_backward, step)
        if self.timeline:
            self.timeline.add("publish", -1, *self.coord.last_publish, step)
            self.timeline.add("round", -1, wall0, t1 - t0, step)
            self.timeline.add("reduce", -1, wall0 + (t1 - t0), t2 - t1, step)
            self.timeline.add("clip+update", -1, wall0 + (t2 - t0), t3 - t2, step)
        ph = self.phase_s
        ph["compute"] += compute
        ph["round"] += t1 - t0
        ph["reduce"] += t2 - t1
        ph["update"] += t3 - t2
        ph["step"] += t3 - t0
        ph["steps"] += 1
        return slowest

    def settle(self) -> int:
        """executors.Executor.settle: the hosts' state after the last step into the store (mesh; a no-op otherwise).
        Returns how many steps it lacks when a host was lost before answering."""
        if self.mesh is not None and not self.mesh.settle():
            return len(self.mesh.done)
        return 0

    def evaluate(self, indices: np.ndarray, weights_replaced: bool = False) -> tuple[float, int]:
        if weights_replaced and self.mesh is not None:  # the hosts hold the weights: the store's are not theirs
            raise ValueError("the mesh data plane evaluates the hosts' weights only")
        if self.mesh is not None and not self.mesh.settle():  # a host was lost before it sent its state
            dead = [p for p in self.coord.peers.values() if p.state is PeerState.DEAD]
            if self.policy != "continue" or not self.coord.active():
                raise WorkerFailure(dead)
            self.log.warning(f"before the evaluation: lost {', '.join(p.describe() for p in dead)}; redoing the steps "
                             f"since the last sync on {len(self.coord.active())} surviving rank(s)")
            self._redo_unsettled()
        # Each worker evaluates in batches of its training shard's size: the layer buffers of that shape exist
        # already (a batch of 256 would make every worker allocate ~0.7 GB more for a few forward passes).
        per_worker = -(-self.cfg.train.batch_size // sum(p.slots for p in self.coord.active()))
        batch = self.cfg.train.eval_batch_size or per_worker
        fields = {"phase": "eval", "epoch": 0, "global_count": len(indices), "eval_batch": batch}

        def attempt_eval(attempt: int):
            if self.mesh is not None:
                self.mesh.ensure(-1, attempt)
            # weights put in the store for this evaluation (train.ema_epochs): with sockets, a version no peer
            # holds (-1 is "none yet"), so every peer gets them in full, and the next step's live weights in full
            return self._round(indices, -1, attempt, fields, -2 - self.version if weights_replaced else None)

        _, results = self._retrying(-1, attempt_eval)
        self._t_end = None  # the time until the next step is the Trainer's epoch end, not a step's serial part
        ranks = sorted(results)  # rank order, never arrival order: the same bits every time (and in a replay)
        return sum(results[r].fields["loss_sum"] for r in ranks), sum(results[r].fields["correct"] for r in ranks)

    def request_stop(self, grace_s: float) -> None:
        self.coord.stop_within(grace_s)

    def meanwhile(self, work):
        """executors.Executor.meanwhile: work() in a thread while this thread answers heartbeats and hellos (a
        checkpoint on a slow disk must not look like a lost coordinator to the workers, whose bound is a few
        seconds). Nothing else is done meanwhile: deaths are noticed by the next round (and no stop deadline applies
        to a save)."""
        out: dict = {}

        def run():
            try:
                out["value"] = work()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                out["error"] = e
        t = threading.Thread(target=run, name="meanwhile", daemon=True)
        t.start()
        while t.is_alive():
            self.coord.service(0.05)
            t.join(0.0)
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def summary(self) -> dict:
        """Mean seconds per step: compute (slowest worker), communication (the rest of the round), reduce, update,
        serial (the coordinator alone, no worker busy); how many messages the coordinator dropped; who summed the sync-BN
        moments."""
        ph = self.phase_s
        n = max(ph["steps"], 1)
        return {"breakdown": {"step_s": ph["step"] / n, "compute_s": ph["compute"] / n,
                              "comm_s": max(ph["round"] - ph["compute"], 0.0) / n, "reduce_s": ph["reduce"] / n,
                              "update_s": ph["update"] / n, "serial_s": ph["serial"] / n,
                              "update_by": "hosts" if self.mesh else "workers" if self.shared else "coordinator"},
                **({"plane": "mesh", "replica_checks": self.mesh.checks} if self.mesh else {}),
                "dropped_messages": self.coord.dropped,
                "bn_sums": "workers (shared memory)" if self.local_bn else
                f"coordinator ({self.coord.bn_reductions} served)" if self.cfg.dist.bn == "sync" else "none"}

    def close(self) -> None:
        if self.timeline:
            self.timeline.write()
