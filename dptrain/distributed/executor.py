"""The distributed executor: the Trainer's `train_step` / `evaluate`, spread over the coordinator's workers.

Every global batch is split into contiguous shards over the live ranks (sizes differ by at most one); each worker
returns the gradient of its shard's share of the *global* mean loss (dlogits / global count), so the reduction is a
plain sum, done in rank order, never arrival order: the same inputs always give the same bits. Under the `continue`
policy a lost rank's step is re-sharded over the survivors and redone from the same weights: nothing is lost.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from .. import log
from ..config import Config
from ..data.sampler import shard_bounds
from ..executors import StepInterrupted, StepResult
from ..nn.params import ParamStore
from ..optim import SGD
from . import invariant
from .coordinator import Coordinator, StopTimeout, WorkerFailure
from .datapaths import HostBuffers, HostsMesh, WorkersSum, data_path, train_fields
from .hostfile import rank_bases
from .timeline import Timeline, busy_s


def split_by_slots(indices: np.ndarray, slots: list[int]) -> tuple[list[np.ndarray], list[list[int]]]:
    """Shard over sum(slots) worker ranks (sizes differ by at most one), then hand each peer the contiguous block
    of its ranks' shards and their sizes: an agent's workers get exactly the shards ranks would get one by one."""
    total, blocks, sizes = sum(slots), [], []
    for n, base in zip(slots, rank_bases(slots)):
        bounds = [shard_bounds(len(indices), r, total) for r in range(base, base + n)]
        blocks.append(indices[bounds[0][0]:bounds[-1][1]])
        sizes.append([b - a for a, b in bounds])
    return blocks, sizes


class DistExecutor:
    """The Trainer's executor (executors.Executor) over a coordinator's peers. It reads and writes the store's flat
    buffers and the optimizer's velocity (the reduced gradient, the weights it publishes) and nothing else of the
    Trainer's. A step is shard -> compute (the round) -> reduce -> norm/clip -> update, the last three by the run's
    data path: the coordinator (CoordinatorSum), one host's workers in shared memory (WorkersSum) or the hosts of
    the mesh (HostsMesh)."""

    def __init__(self, coord: Coordinator, store: ParamStore, opt: SGD, cfg: Config, buffers: HostBuffers,
                 timeline: Timeline | None = None):
        self.coord, self.store, self.opt, self.cfg = coord, store, opt, cfg
        self.local_bn, self.shared = buffers.local_bn, buffers.shared
        self.policy = cfg.dist.on_worker_failure
        self.timeline = timeline
        self.version = 0
        self.log = log.get()
        self.phase_s = {"compute": 0.0, "round": 0.0, "reduce": 0.0, "update": 0.0, "serial": 0.0, "step": 0.0,
                        "steps": 0}
        self._t_end: float | None = None  # when the coordinator last stopped waiting on the workers
        self.path = data_path(self, buffers)
        self.mesh = self.path.plane if isinstance(self.path, HostsMesh) else None
        # the workers keep train.ema's average (SharedUpdate.avg2): the Trainer leaves it to them
        self.averages = isinstance(self.path, WorkersSum) and self.path.averages

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
                self.path.recover()

    def _round(self, indices: np.ndarray, step: int, attempt: int, fields: dict, version: int | None = None
               ) -> tuple[list[int], dict]:
        """One STEP round. `version`: the weights' version with sockets (default self.version)."""
        peers = self.path.peers(self.coord.active())
        if not peers:
            raise WorkerFailure([])
        B = invariant.enabled(self.cfg) if fields["phase"] == "train" else 0
        blocks, sizes = invariant.split_blocks(indices, [p.slots for p in peers], B) if B else \
            split_by_slots(indices, [p.slots for p in peers])
        # fewer images than slots (a small batch, a short last batch, a tiny val set): a peer with no image sits
        # the round out; an empty shard would crash its worker (a batch of 0) and stall sync BN. On the mesh every
        # host takes part in a training step (its agent contributes zeros and still owns its slice).
        every_peer = self.path.every_peer_trains and fields["phase"] == "train"
        keep = [i for i, b in enumerate(blocks) if len(b) or every_peer]
        ranks = [peers[i].rank for i in keep]
        shards = {peers[i].rank: blocks[i] for i in keep}
        shard_sizes = {peers[i].rank: sizes[i] for i in keep}
        fields = fields | {"weights_slot": self.shared.cur if self.shared else -1}
        if self.local_bn and fields["phase"] == "train":  # whose rows each rank's shared-memory BN sums wait for
            fields["ranks"] = ranks
        payload = self.path.round_payload()
        self._serial_until_now()
        version = self.version if version is None else version
        results = self.coord.round(step, attempt, shards, fields, payload.get("weights"), version,
                                   payload.get("update"), shard_sizes, arrays=payload.get("arrays"),
                                   side=payload.get("side"))
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
            return self._attempt(indices, epoch, step, lr, attempt, fields)

        ranks, results, norm, t1, t2 = self._retrying(step, attempt_step)
        moments = sum(np.asarray(results[r].arrays["bn_moments"], np.float64) for r in ranks
                      if "bn_moments" in results[r].arrays)
        if invariant.enabled(self.cfg):  # every rank reports the same exact global moments
            moments = np.asarray(results[ranks[0]].arrays["bn_moments"], np.float64)
        t3 = time.perf_counter()
        if self.path.serial:  # the coordinator did the bulk work itself: all of it was serial
            self.phase_s["serial"] += t3 - t1
            self._t_end = t3
        self.version += 1
        slowest = self._account(ranks, results, step, t0, wall0, t1, t2, t3)
        partial = self.mesh is None and self.coord.token is not None and len(ranks) < self.coord.world_size
        cipher = [results[r].fields["cipher_cpu_s"] for r in ranks if "cipher_cpu_s" in results[r].fields]
        return StepResult(len(indices), sum(results[r].fields["loss_sum"] for r in ranks),
                          sum(results[r].fields["correct"] for r in ranks), moments, norm, slowest=f"rank {slowest}",
                          ranks=ranks if partial else None,  # metrics.jsonl: what a replay must follow
                          cipher_cpu_s=float(sum(cipher)) if any(cipher) else None)

    def _attempt(self, indices: np.ndarray, epoch: int, step: int, lr: float, attempt: int, fields: dict):
        """One try at a training step: shard -> compute (the round) -> the data path's reduce, norm/clip, update."""
        self.path.begin(step, attempt)
        ranks, results = self._round(indices, step, attempt, fields)
        t1 = time.perf_counter()
        norm, t2 = self.path.step(step, attempt, ranks, results, lr, indices, epoch)
        return ranks, results, norm, t1, t2

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
        return self.path.settle()

    def evaluate(self, indices: np.ndarray, weights_replaced: bool = False) -> tuple[float, int]:
        self.path.before_evaluate(weights_replaced)
        # Each worker evaluates in batches of its training shard's size: the layer buffers of that shape exist
        # already (a batch of 256 would make every worker allocate ~0.7 GB more for a few forward passes).
        per_worker = -(-self.cfg.train.batch_size // sum(p.slots for p in self.coord.active()))
        batch = self.cfg.train.eval_batch_size or per_worker
        fields = {"phase": "eval", "epoch": 0, "global_count": len(indices), "eval_batch": batch}

        def attempt_eval(attempt: int):
            self.path.begin(-1, attempt)
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
                              "update_by": self.path.update_by},
                **({"plane": "mesh", "replica_checks": self.mesh.checks} if self.mesh else {}),
                "dropped_messages": self.coord.dropped,
                "bn_sums": "workers (shared memory)" if self.local_bn else
                f"coordinator ({self.coord.bn_reductions} served)" if self.cfg.dist.bn == "sync" else "none"}

    def close(self) -> None:
        if self.timeline:
            self.timeline.write()
