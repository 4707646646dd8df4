"""The data paths of a distributed step: what happens after the round that computed the shards' gradients, until
the next weights exist (reduce -> norm/clip -> update), one object each behind one interface (DataPath):
    CoordinatorSum  the coordinator sums in rank order, clips and updates (one host's shared rows or socket frames;
                    float32 blocks, the factored Linear's factors or the batch-invariant int64 sums; the float16 wire)
    WorkersSum      one host's workers reduce-scatter, report squares, clip + update their slices in shared memory
    HostsMesh       the hosts' mesh plane (mesh.py / mesh_plane.py), with its recovery after a lost host
DistExecutor (executor.py) runs the rounds and hands each step to the run's path.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..optim import add_blocks, checked_clip, chunk_slices, clipped_step
from . import invariant, protocol as P
from .coordinator import WorkerFailure
from .mesh_plane import MeshPlane
from .peers import PeerState
from .reduce import Factors, reduce_range
from .wire import apply_update16


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


@dataclass
class HostBuffers:
    """What a launcher set up for the run's data path, beside the coordinator (the `Session`)."""
    grad_slots: np.ndarray | None = None  # one host's shared gradient rows (N, P); None: gradients come as frames
    shared: SharedUpdate | None = None  # dist.update = "workers": the double buffers the workers update
    factor_slots: tuple | None = None  # dist.factored on one host: (w0, K, F, x slots, dy slots) of the hidden Linear
    local_bn: bool = False  # one host, --bn sync: STEP names the round's ranks, whose BN sums meet in shm
    mesh: bool = False  # the peers are host agents that reduce and update among themselves (dist.plane = "mesh")
    reducers: int | None = None  # dist.update = "workers": at most this many (the first active) ranks reduce


class DataPath:
    """How a step's gradients become the next weights, after the round that computed them: the part of a step that
    differs between the data paths. `serial`: the coordinator does the bulk work itself (all of it is serial time);
    `every_peer_trains`: every peer takes part in a training step even with no image (it owns a slice). `ex`: the
    DistExecutor it serves (its coordinator, store, optimizer, config, and its rounds for a mesh's redo)."""

    update_by = ""
    serial = False
    every_peer_trains = False

    def __init__(self, ex, buffers: HostBuffers):
        self.ex = ex

    def peers(self, peers: list) -> list:
        """The peers that take part in this round."""
        return peers

    def begin(self, step: int, attempt: int) -> None:
        """Before the round of a step's (or an evaluation's, step -1) try."""

    def recover(self) -> None:
        """After a lost peer, before the step is tried again over the survivors."""

    def settle(self) -> int:
        """executors.Executor.settle: the state after the last step into the store; how many steps it lacks."""
        return 0

    def before_evaluate(self, weights_replaced: bool) -> None:
        """Before an evaluation round (`weights_replaced`: the store holds weights put there for it)."""

    def round_payload(self) -> dict:
        """What the round sends beside the shards: weights (full or as an update), arrays, a side-message handler."""
        return {}

    def step(self, step: int, attempt: int, ranks: list[int], results: dict, lr: float, indices: np.ndarray,
             epoch: int) -> tuple[float, float]:
        """Reduce, norm/clip and update; returns (the global gradient norm, when the reduction ended)."""
        raise NotImplementedError


class CoordinatorSum(DataPath):
    """The coordinator sums the ranks' gradients in rank order, clips and updates; the weights go out in the round
    (sockets: as frames, full or as a float16 update; shared memory: read in place). Its parts: where a rank's
    gradient is (its shared row or its frame), how ranks are summed (float32 blocks, with the hidden Linear's from
    its factors, or the batch-invariant exact int64 sums), and how the weights travel."""

    update_by = "coordinator"
    serial = True

    def __init__(self, ex, buffers: HostBuffers):
        super().__init__(ex, buffers)
        self.grad_slots, self.factor_slots = buffers.grad_slots, buffers.factor_slots
        store = ex.store
        # Weights over sockets with a float16 wire: after the first full copy, peers get the float16-rounded update
        # (wire.apply_update16 keeps the coordinator's weights equal to what the peers rebuild from it).
        self.update16 = self.grad_slots is None and ex.cfg.dist.wire_dtype == "float16"
        if self.update16:
            self.prev_params = store.params.copy()
            self.update_f16 = np.empty(store.num_params, np.float16)
            self.update_scale = 1.0

    def round_payload(self) -> dict:
        if self.grad_slots is not None:  # shared memory: the workers read the weights in place
            return {}
        store = self.ex.store
        update = None
        if self.update16 and self.ex.version > 0:  # version 0: no update yet, everyone needs a full copy
            update = {"arrays": {"update": self.update_f16, "buffers": store.buffers}, "scale": self.update_scale}
        return {"weights": {"params": store.params, "buffers": store.buffers}, "update": update}

    def step(self, step, attempt, ranks, results, lr, indices, epoch) -> tuple[float, float]:
        ex = self.ex
        store = ex.store
        parts = [self.grad_slots[r] if self.grad_slots is not None else results[r].arrays["grad"] for r in ranks]
        if invariant.enabled(ex.cfg):  # int64 block sums: exact in any order, rounded once
            invariant.decode_grads(store.grads, parts)
        else:
            reduce_range(store.grads, parts, 0, store.num_params,
                         [float(results[r].fields["grad_scale"]) for r in ranks], self._factors(ranks, results))
        t_reduced = time.perf_counter()
        norm = clipped_step(ex.opt, store.params, store.grads, lr, ex.cfg.train.clip_norm, step)
        if self.update16:
            self.update_scale = apply_update16(store.params, self.prev_params, self.update_f16)
        return norm, t_reduced

    def _factors(self, ranks: list[int], results: dict) -> Factors | None:
        """dist.factored on one host: every rank's factors of the hidden Linear, as many rows as its shard."""
        if self.factor_slots is None:
            return None
        return Factors.of_slots(self.factor_slots, ranks, [results[r].fields["count"] for r in ranks])


class WorkersSum(DataPath):
    """dist.update = "workers" on one host: the workers reduce-scatter, report their slices' squares for the exact
    global norm, and clip + update their slices of the shared double buffers; the coordinator decides (norm -> clip
    factor) and flips the buffer."""

    update_by = "workers"

    def __init__(self, ex, buffers: HostBuffers):
        super().__init__(ex, buffers)
        self.shared, self.factored = buffers.shared, buffers.factor_slots is not None
        # At most `reducers` of the workers (the first active ones) reduce and update, one per physical core: more
        # would only take turns on the cores, each woken for a smaller slice. Any number gives the same bits
        # (slices on CHUNK boundaries, every element summed in rank order).
        self.reducers = buffers.reducers
        self.averages = self.shared.avg2 is not None  # the workers keep train.ema's average: the Trainer leaves it

    def step(self, step, attempt, ranks, results, lr, indices, epoch) -> tuple[float, float]:
        ex, sh = self.ex, self.shared
        peers = [p.rank for p in ex.coord.active()][:self.reducers]
        slices = dict(zip(peers, chunk_slices(ex.store.num_params, len(peers))))
        ex._serial_until_now()
        counts = {"counts": [results[r].fields["count"] for r in ranks]} if self.factored else {}
        got = ex.coord.exchange(P.Kind.REDUCE, P.Kind.REDUCED, step, attempt,
                                {r: {"lo": lo, "hi": hi, "ranks": ranks, **counts} for r, (lo, hi) in slices.items()})
        t_reduced = ex._t_end = time.perf_counter()
        squares = np.concatenate([got[r].arrays["squares"] for r in peers])  # slice order = block order
        norm = math.sqrt(add_blocks(squares))
        scale = checked_clip(norm, ex.cfg.train.clip_norm, step)
        ex._serial_until_now()
        ema = {"ema_rate": float(sh.average.rate)} if self.averages else {}
        ex.coord.exchange(P.Kind.UPDATE, P.Kind.UPDATED, step, attempt,
                          {r: {"lo": lo, "hi": hi, "lr": lr, "scale": scale, "src": sh.cur, **ema}
                           for r, (lo, hi) in slices.items()})
        ex._t_end = time.perf_counter()
        sh.cur = 1 - sh.cur  # the step is whole: its weights (and their average) become the current ones
        ex.store.rebind(sh.params2[sh.cur], sh.gsum, ex.store.buffers, copy=False)
        ex.opt.velocity = sh.velocity2[sh.cur]
        if self.averages:
            sh.average.params = sh.avg2[sh.cur]
        return norm, t_reduced


class HostsMesh(DataPath):
    """dist.plane = "mesh": the hosts reduce-scatter, the coordinator decides (norm -> clip), the hosts update and
    all-gather (mesh.py); every sync_every steps the hosts' state comes back (mesh_plane.py). The hosts hold the
    weights; the BN statistics are the Trainer's. Every host takes part in a training step (with no image, its
    agent contributes zeros and still owns its slice)."""

    update_by = "hosts"
    every_peer_trains = True

    def __init__(self, ex, buffers: HostBuffers):
        super().__init__(ex, buffers)
        self.plane = MeshPlane(ex.coord, ex.store, ex.opt, ex.cfg)

    def peers(self, peers: list) -> list:
        """A host that joined is in the plane (it has the weights) from its next forming."""
        return [p for p in peers if p.rank in self.plane.formed]

    def begin(self, step: int, attempt: int) -> None:
        self.plane.ensure(step, attempt)

    def round_payload(self) -> dict:
        return {"arrays": {"buffers": self.ex.store.buffers}, "side": self.plane.on_message}

    def recover(self) -> None:
        """After a loss: the hosts' state comes in if every host answers; otherwise the steps since the last sync
        are redone over the survivors from the synced state (their results were already reported; the redo only
        rebuilds the state)."""
        ex = self.ex
        if self.plane.settle():
            return
        steps = self.plane.unsynced()
        ex.log.warning(f"steps {steps[0].step}..{steps[-1].step}: redoing them over the survivors from the state "
                       f"synced before them")
        for d in steps:
            fields = train_fields(d.indices, d.epoch)
            ex._retrying(d.step, lambda attempt, d=d, fields=fields: ex._attempt(
                d.indices, d.epoch, d.step, d.lr, attempt, fields), attempt=d.attempt + 1)
        if not self.plane.settle():  # lost another host meanwhile: again, from what is left
            self.recover()

    def settle(self) -> int:
        """The hosts' state after the last step into the store; how many steps it lacks when a host was lost
        before answering."""
        return 0 if self.plane.settle() else len(self.plane.done)

    def before_evaluate(self, weights_replaced: bool) -> None:
        ex = self.ex
        if weights_replaced:  # the hosts hold the weights: the store's are not theirs
            raise ValueError("the mesh data plane evaluates the hosts' weights only")
        if not self.plane.settle():  # a host was lost before it sent its state
            dead = [p for p in ex.coord.peers.values() if p.state is PeerState.DEAD]
            if ex.policy != "continue" or not ex.coord.active():
                raise WorkerFailure(dead)
            ex.log.warning(f"before the evaluation: lost {', '.join(p.describe() for p in dead)}; redoing the steps "
                           f"since the last sync on {len(ex.coord.active())} surviving rank(s)")
            self.recover()

    def step(self, step, attempt, ranks, results, lr, indices, epoch) -> tuple[float, float]:
        return self.plane.decide(step, attempt, results, lr, indices, epoch), time.perf_counter()


def data_path(ex, buffers: HostBuffers) -> DataPath:
    """The run's data path, from what its launcher set up."""
    if buffers.mesh:
        return HostsMesh(ex, buffers)
    if buffers.shared is not None:
        return WorkersSum(ex, buffers)
    return CoordinatorSum(ex, buffers)
