"""The distributed executor: the Trainer's `train_step` / `evaluate`, spread over the coordinator's workers.

Every global batch is split into contiguous shards over the live ranks (sizes differ by at most one); each worker
returns the gradient of its shard's share of the *global* mean loss (dlogits / global count), so the reduction is a
plain sum, done in rank order, never arrival order: the same inputs always give the same bits. Under the `continue`
policy a lost rank's step is re-sharded over the survivors and redone from the same weights: nothing is lost.
"""
from __future__ import annotations

import time

import numpy as np

from .. import log
from ..config import Config
from ..data.sampler import shard_bounds
from ..nn.params import ParamStore
from ..train import StepInterrupted, StepResult
from .coordinator import Coordinator, StopTimeout, WorkerFailure
from .hostfile import rank_bases
from .reduce import sum_in_order
from .timeline import Timeline
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


class DistExecutor:
    """The Trainer's executor (train.Executor) over a coordinator's peers. It reads and writes the store's flat
    buffers (the gradient it reduces, the weights it publishes) and nothing else of the Trainer's."""

    def __init__(self, coord: Coordinator, store: ParamStore, cfg: Config, grad_slots: np.ndarray | None,
                 timeline: Timeline | None = None):
        self.coord, self.store, self.cfg, self.grad_slots = coord, store, cfg, grad_slots
        self.policy = cfg.dist.on_worker_failure
        self.timeline = timeline
        self.version = 0
        self.log = log.get()
        self.phase_s = {"compute": 0.0, "reduce": 0.0, "update": 0.0, "step": 0.0, "steps": 0}
        self._t_done = None
        self._step = 0
        # Weights over sockets with a float16 wire: after the first full copy, peers get the float16-rounded update
        # (wire.apply_update16 keeps the coordinator's weights equal to what the peers rebuild from it).
        self.update16 = grad_slots is None and cfg.dist.wire_dtype == "float16"
        if self.update16:
            self.prev_params = store.params.copy()
            self.update_f16 = np.empty(store.num_params, np.float16)
            self.update_scale = 1.0

    def _round(self, indices: np.ndarray, step: int, fields: dict) -> tuple[list[int], dict]:
        attempt = 0
        while True:
            peers = self.coord.active()
            if not peers:
                raise WorkerFailure([])
            blocks, sizes = split_by_slots(indices, [p.slots for p in peers])
            # fewer images than slots (a small batch, a short last batch, a tiny val set): a peer with no image sits
            # the round out; an empty shard would crash its worker (a batch of 0) and stall sync BN
            keep = [i for i, b in enumerate(blocks) if len(b)]
            ranks = [peers[i].rank for i in keep]
            shards = {peers[i].rank: blocks[i] for i in keep}
            shard_sizes = {peers[i].rank: sizes[i] for i in keep}
            weights = update = None
            if self.grad_slots is None:  # sockets; with shared memory the workers read the weights in place
                weights = {"params": self.store.params, "buffers": self.store.buffers}
                if self.update16 and self.version > 0:  # version 0: no update yet, everyone needs a full copy
                    update = {"arrays": {"update": self.update_f16, "buffers": self.store.buffers},
                              "scale": self.update_scale}
            try:
                return ranks, self.coord.round(step, attempt, shards, fields, weights, self.version, update,
                                               shard_sizes)
            except StopTimeout as e:
                raise StepInterrupted(str(e)) from None
            except WorkerFailure as e:
                survivors = self.coord.active()
                if self.policy != "continue" or not survivors:
                    raise
                attempt += 1
                self.log.warning(f"step {step}: lost {', '.join(p.describe() for p in e.peers)}; redoing the step "
                                 f"on {len(survivors)} surviving rank(s)")

    def train_step(self, indices: np.ndarray, epoch: int, step: int) -> StepResult:
        t0 = time.perf_counter()
        wall0 = time.time()
        ranks, results = self._round(indices, step, {"phase": "train", "epoch": epoch,
                                                     "global_count": len(indices), "eval_batch": 0})
        t1 = time.perf_counter()
        sum_in_order(self.store.grads, [self.grad_slots[r] if self.grad_slots is not None
                                        else results[r].arrays["grad"] for r in ranks],
                     [float(results[r].fields["grad_scale"]) for r in ranks])
        moments = np.zeros_like(results[ranks[0]].arrays["bn_moments"], dtype=np.float64)
        for rank in ranks:
            moments += results[rank].arrays["bn_moments"]
        t2 = time.perf_counter()
        compute = 0.0
        slowest, slowest_s = ranks[0], -1.0
        for rank in ranks:
            tm = results[rank].fields["timings"]
            busy = sum(v[1] for k, v in tm.items() if k != "wait")
            compute = max(compute, busy)
            if busy > slowest_s:
                slowest, slowest_s = rank, busy
            if self.timeline:
                for name, (start, dur) in tm.items():
                    self.timeline.add(name, rank, start, dur, step)
                end_backward = tm["backward"][0] + tm["backward"][1]
                self.timeline.add("send", rank, end_backward, results[rank].fields["sent_at"] - end_backward, step)
        if self.timeline:
            self.timeline.add("publish", -1, *self.coord.last_publish, step)
            self.timeline.add("round", -1, wall0, t1 - t0, step)
            self.timeline.add("reduce", -1, wall0 + (t1 - t0), t2 - t1, step)
        self.phase_s["compute"] += compute
        self.phase_s["reduce"] += t2 - t1
        self._t_done, self._t_start, self._wall_done, self._step = time.perf_counter(), t0, time.time(), step
        return StepResult(len(indices), sum(results[r].fields["loss_sum"] for r in ranks),
                          sum(results[r].fields["correct"] for r in ranks), moments, slowest=f"rank {slowest}")

    def weights_updated(self) -> None:
        """Called after clip + SGD + BN update: the coordinator's share of the step ends here."""
        if self.update16:
            self.update_scale = apply_update16(self.store.params, self.prev_params, self.update_f16)
        self.version += 1
        now = time.perf_counter()
        if self._t_done is not None:
            self.phase_s["update"] += now - self._t_done
            self.phase_s["step"] += now - self._t_start
            self.phase_s["steps"] += 1
            if self.timeline:
                self.timeline.add("clip+update", -1, self._wall_done, now - self._t_done, self._step)

    def evaluate(self, indices: np.ndarray) -> tuple[float, int]:
        # Each worker evaluates in batches of its training shard's size: the layer buffers of that shape exist
        # already (a batch of 256 would make every worker allocate ~0.7 GB more for a few forward passes).
        per_worker = -(-self.cfg.train.batch_size // sum(p.slots for p in self.coord.active()))
        batch = self.cfg.train.eval_batch_size or per_worker
        _, results = self._round(indices, -1, {"phase": "eval", "epoch": 0, "global_count": len(indices),
                                               "eval_batch": batch})
        return sum(r.fields["loss_sum"] for r in results.values()), sum(r.fields["correct"] for r in results.values())

    def request_stop(self, grace_s: float) -> None:
        self.coord.stop_within(grace_s)

    def summary(self) -> dict:
        """Mean seconds per step: compute (slowest worker), communication (the rest of the round), reduce, update;
        and how many malformed or unexpected messages the coordinator dropped."""
        n = max(self.phase_s["steps"], 1)
        step = self.phase_s["step"] / n
        compute, reduce, update = self.phase_s["compute"] / n, self.phase_s["reduce"] / n, self.phase_s["update"] / n
        return {"breakdown": {"step_s": step, "compute_s": compute, "comm_s": max(step - compute - reduce - update, 0.0),
                              "reduce_s": reduce, "update_s": update},
                "dropped_messages": self.coord.dropped}

    def close(self) -> None:
        if self.timeline:
            self.timeline.write()
