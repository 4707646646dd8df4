"""The distributed executor: the Trainer's `train_step` / `evaluate`, spread over the coordinator's workers.

Every global batch is split into contiguous shards over the live ranks (sizes differ by at most one); each worker
returns the gradient of its shard's share of the *global* mean loss (dlogits / global count), so the reduction is a
plain sum, done in rank order, never arrival order: the same inputs always give the same bits. Under the `continue`
policy a lost rank's step is re-sharded over the survivors and redone from the same weights: nothing is lost.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .. import log
from ..data.sampler import shard_bounds
from ..optim import CHUNK
from ..train import StepResult
from .coordinator import Coordinator, WorkerFailure
from .wire import apply_update16


def sum_in_order(out: np.ndarray, parts: list[np.ndarray], scales: list[float] | None = None) -> None:
    """out = ((parts[0] + parts[1]) + parts[2]) + ..., always in this order (rank order: the same bits whoever
    arrives first), block by block so each block of `out` stays in cache while every part is added to it.
    float16 parts (the wire format) are widened and multiplied by their power-of-two scale (exact)."""
    scales = scales or [1.0] * len(parts)
    tmp = np.empty(min(CHUNK, out.size), np.float32)
    for a in range(0, out.size, CHUNK):
        block, t = out[a:a + CHUNK], tmp[:min(CHUNK, out.size - a)]
        for i, (p, s) in enumerate(zip(parts, scales)):
            src = p[a:a + CHUNK]
            if p.dtype != out.dtype:
                np.multiply(src, np.float32(s), out=t, casting="unsafe")
                src = t
            if i == 0:
                np.copyto(block, src)
            else:
                np.add(block, src, out=block)


def split_by_slots(indices: np.ndarray, slots: list[int]) -> tuple[list[np.ndarray], list[list[int]]]:
    """Shard over sum(slots) worker ranks (sizes differ by at most one), then hand each peer the contiguous block
    of its ranks' shards and their sizes: an agent's workers get exactly the shards ranks would get one by one."""
    total, blocks, sizes, rank = sum(slots), [], [], 0
    for n in slots:
        bounds = [shard_bounds(len(indices), r, total) for r in range(rank, rank + n)]
        blocks.append(indices[bounds[0][0]:bounds[-1][1]])
        sizes.append([b - a for a, b in bounds])
        rank += n
    return blocks, sizes


class Timeline:
    """Chrome trace events (chrome://tracing, Perfetto): one row per rank plus the coordinator's."""

    def __init__(self, path: str):
        self.path, self.events = path, []

    def add(self, name: str, rank: int, start_s: float, dur_s: float, step: int) -> None:
        self.events.append({"name": name, "ph": "X", "ts": start_s * 1e6, "dur": max(dur_s, 0) * 1e6,
                            "pid": 0, "tid": "coordinator" if rank < 0 else f"rank {rank}", "args": {"step": step}})

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)


class DistExecutor:
    def __init__(self, coord: Coordinator, trainer, grad_slots: np.ndarray | None, policy: str,
                 timeline: Timeline | None = None):
        self.coord, self.trainer, self.grad_slots, self.policy = coord, trainer, grad_slots, policy
        self.store = trainer.store
        self.timeline = timeline
        self.version = 0
        self.log = log.get()
        self.phase_s = {"compute": 0.0, "reduce": 0.0, "update": 0.0, "step": 0.0, "steps": 0}
        self._t_done = None
        self._step = 0
        # Weights over sockets with a float16 wire: after the first full copy, peers get the float16-rounded update
        # (wire.apply_update16 keeps the coordinator's weights equal to what the peers rebuild from it).
        self.delta16 = grad_slots is None and trainer.cfg.dist.wire_dtype == "float16"
        if self.delta16:
            self.prev_params = self.store.params.copy()
            self.update16 = np.empty(self.store.num_params, np.float16)
            self.update_scale = 1.0

    def _weights(self) -> tuple[dict | None, dict | None]:
        """(full weights, the last update) for peers one version behind; None, None with shared memory."""
        if self.grad_slots is not None:
            return None, None  # shared memory: the workers read the coordinator's weights in place
        full = {"params": self.store.params, "buffers": self.store.buffers}
        has_update = self.delta16 and self.version > 0  # version 0: no update yet, everyone needs a full copy
        return full, ({"dparams": self.update16, "buffers": self.store.buffers} if has_update else None)

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
            sizes = {peers[i].rank: sizes[i] for i in keep} if any(p.slots > 1 for p in peers) else None
            try:
                full, delta = self._weights()
                return ranks, self.coord.round(step, attempt, shards, fields, full, self.version, sizes,
                                               delta=delta, delta_fields={"dscale": self.update_scale}
                                               if delta is not None else None)
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
        ranks, results = self._round(indices, step, {"epoch": epoch, "flags": {
            "phase": "train", "global_count": len(indices)}})
        t1 = time.perf_counter()
        sum_in_order(self.store.grads, [self.grad_slots[r] if self.grad_slots is not None
                                        else results[r].arrays["grad"] for r in ranks],
                     [float(results[r].fields.get("grad_scale", 1.0)) for r in ranks])
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
                self.timeline.add("send", rank, tm["backward"][0] + tm["backward"][1],
                                  results[rank].fields.get("sent_at", 0) - tm["backward"][0] - tm["backward"][1], step)
        if self.timeline:
            self.timeline.add("publish", -1, *self.coord.last_publish, step)
            self.timeline.add("round", -1, wall0, t1 - t0, step)
            self.timeline.add("reduce", -1, wall0 + (t1 - t0), t2 - t1, step)
        self.phase_s["compute"] += compute
        self.phase_s["reduce"] += t2 - t1
        self._t_done, self._t_start, self._wall_done, self._step = time.perf_counter(), t0, time.time(), step
        return StepResult(len(indices), sum(results[r].fields["loss_sum"] for r in ranks),
                          sum(results[r].fields["correct"] for r in ranks), moments,
                          {"round": t1 - t0, "reduce": t2 - t1}, slowest=f"rank {slowest}")

    def weights_updated(self) -> None:
        """Called after clip + SGD + BN update: the coordinator's share of the step ends here."""
        if self.delta16:
            self.update_scale = apply_update16(self.store.params, self.prev_params, self.update16)
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
        per_worker = -(-self.trainer.cfg.train.batch_size // sum(p.slots for p in self.coord.active()))
        batch = self.trainer.cfg.train.eval_batch_size or per_worker
        ranks, results = self._round(indices, -1, {"epoch": 0, "flags": {"phase": "eval", "batch": batch}})
        return sum(r.fields["loss_sum"] for r in results.values()), sum(r.fields["correct"] for r in results.values())

    def breakdown(self) -> dict:
        """Mean seconds per step: compute (slowest worker), communication (the rest of the round), reduce, update."""
        n = max(self.phase_s["steps"], 1)
        step = self.phase_s["step"] / n
        compute, reduce, update = self.phase_s["compute"] / n, self.phase_s["reduce"] / n, self.phase_s["update"] / n
        return {"step_s": step, "compute_s": compute, "comm_s": max(step - compute - reduce - update, 0.0),
                "reduce_s": reduce, "update_s": update}

    def close(self) -> None:
        if self.timeline:
            self.timeline.write()
