"""The mesh data plane, the coordinator's side (mesh.py tells the whole step).

The coordinator forms the plane (MESH: who owns which slice, where the others are, the state to start from),
decides every step's (lr, clip factor) from the hosts' block sums of squares (UPDATE), and keeps the authoritative
weights and momentum by applying each step's update itself from the reduced slices the hosts send once they are done
(UPDATED). Those arrive during the next step's compute, so its own update is off the critical path: after step k
returns, the coordinator's copy is at step k − 1 until `settle` (before a checkpoint or an evaluation) or the next
step's round brings the slices in. A host's UPDATED of step k is sent before its RESULT of step k + 1 on the same
connection, so the next round never ends without them.

When a host is lost: if every slice of the last step came in, the step is committed; otherwise the step is redone
over the survivors from the committed state (the executor does that, `redo`). Either way the plane is formed anew
over the survivors with fresh slices and the coordinator's state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import log
from ..config import Config
from ..nn.params import ParamStore
from ..optim import SGD, add_blocks, checked_clip, chunk_slices
from ..train import ExecutorFailure
from . import protocol as P
from .coordinator import Coordinator, WorkerFailure
from .mesh import checksum
from .wire import apply_update16


class ReplicaMismatch(ExecutorFailure):
    """A host's weights differ from the coordinator's: a bug or a corrupted host, never to be trained past."""


@dataclass
class Pending:
    """A step whose update the hosts applied and the coordinator has not yet: what it takes to apply it (the reduced
    slices, as they come) or to redo it (its batch)."""
    step: int
    attempt: int
    lr: float
    scale: float
    indices: np.ndarray
    epoch: int
    slices: dict[int, tuple[int, int]]
    got: dict[int, np.ndarray] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.got) == len(self.slices)


class MeshPlane:
    def __init__(self, coord: Coordinator, store: ParamStore, opt: SGD, cfg: Config):
        self.coord, self.store, self.opt, self.cfg = coord, store, opt, cfg
        self.log = log.get()
        self.mesh_id = 0
        self.formed: tuple[int, ...] = ()
        self.slices: dict[int, tuple[int, int]] = {}
        self.pending: Pending | None = None
        self.wire16 = cfg.dist.wire_dtype == "float16"
        self.prev = store.params.copy() if self.wire16 else None  # the weights before the last update
        self.out16 = np.empty(store.num_params, np.float16) if self.wire16 else None
        self.checks = 0  # replica checksums compared

    def ensure(self, step: int, attempt: int) -> None:
        """Form the plane over the live hosts unless it is formed over exactly them: slices, peers' addresses and
        keys, and the coordinator's (committed) state to every host."""
        ranks = tuple(p.rank for p in self.coord.active())
        if ranks == self.formed:
            return
        assert self.pending is None, "a step is in flight: settle or redo it before the plane is formed again"
        self.slices = dict(zip(ranks, chunk_slices(self.store.num_params, len(ranks))))
        self.mesh_id += 1
        peers = self.coord.peers
        hosts = [[r, peers[r].mesh_endpoint, peers[r].mesh_key, lo, hi, peers[r].host]
                 for r, (lo, hi) in self.slices.items()]
        for r, (lo, hi) in self.slices.items():
            self.coord.send(peers[r], P.Kind.MESH, step=step, attempt=attempt, mesh_id=self.mesh_id, hosts=hosts,
                            arrays={"params": self.store.params, "buffers": self.store.buffers,
                                    "velocity": self.opt.velocity[lo:hi]})
        self.coord.collect(step, attempt, list(ranks), P.Kind.MESHED)
        self.formed = ranks
        if self.wire16:
            np.copyto(self.prev, self.store.params)
        mb = self.store.num_params * 4 / len(ranks) / 1e6
        self.log.info(f"mesh data plane {self.mesh_id} over {len(ranks)} hosts "
                      f"({', '.join(peers[r].host for r in ranks)}): {mb:.1f} MB slices")

    def decide(self, step: int, attempt: int, results: dict[int, P.Message], lr: float, indices: np.ndarray,
               epoch: int) -> float:
        """The exact global norm from the hosts' block sums (slice order is block order), the clip factor, UPDATE
        to every host; then the previous step's update on the coordinator's copy and, when the hosts sent them,
        the replica checksums. Returns the norm."""
        squares = np.concatenate([results[r].arrays["squares"] for r in self.formed])
        norm = math.sqrt(add_blocks(squares))
        scale = checked_clip(norm, self.cfg.train.clip_norm, step)
        for r, (lo, hi) in self.slices.items():
            self.coord.send(self.coord.peers[r], P.Kind.UPDATE, step=step, attempt=attempt, lo=lo, hi=hi, lr=lr,
                            scale=scale, src=-1)
        prev, self.pending = self.pending, Pending(step, attempt, lr, scale, indices, epoch, dict(self.slices))
        if prev is not None:
            if not prev.complete():  # a host's UPDATED precedes its RESULT: this cannot be short
                raise RuntimeError(f"step {prev.step}: reduced slices missing from ranks "
                                   f"{sorted(set(prev.slices) - set(prev.got))}")
            self._apply(prev)
        self._verify(step, results)
        return norm

    def on_message(self, msg: P.Message) -> None:
        """A round's side channel: the reduced slices of the step in flight."""
        p = self.pending
        if msg.kind is not P.Kind.UPDATED or p is None or msg.step != p.step or msg.fields["attempt"] != p.attempt:
            return
        lo, hi = p.slices.get(msg.rank, (0, -1))
        grad = msg.arrays.get("grad")
        if grad is None or grad.dtype != np.float32 or grad.size != hi - lo:
            self.coord._dropped(f"dropped UPDATED from rank {msg.rank}: not its slice [{lo}, {hi}) in float32")
            return
        p.got[msg.rank] = grad

    def settle(self) -> bool:
        """Apply the step in flight to the coordinator's copy once its slices are in (waiting for them). False when
        a host holding one is lost (the copy stays one step behind; `redo` recovers it)."""
        p = self.pending
        if p is None:
            return True
        missing = [r for r in p.slices if r not in p.got]
        if missing:
            try:
                got = self.coord.collect(p.step, p.attempt, missing, P.Kind.UPDATED, side=self.on_message)
            except WorkerFailure:
                return False
            for m in got.values():
                self.on_message(m)
            if not p.complete():
                return False
        self._apply(p)
        self.pending = None
        return True

    def take_unsettled(self) -> Pending | None:
        """The step in flight that cannot be applied (a host lost with its slice), handed to the caller to redo."""
        p, self.pending = self.pending, None
        self.formed = ()  # what the hosts hold is past the committed state: form again from the coordinator's
        return p

    def _apply(self, p: Pending) -> None:
        """The hosts' update of step p on the coordinator's copy: the same SGD on the same reduced gradient, and
        with the float16 wire the same rounding of each slice's step."""
        grads, params = self.store.grads, self.store.params
        for r, (lo, hi) in p.slices.items():
            grads[lo:hi] = p.got[r]
        self.opt.step(params, grads, p.lr, p.scale)
        if self.wire16:
            for lo, hi in p.slices.values():
                apply_update16(params[lo:hi], self.prev[lo:hi], self.out16[lo:hi])

    def _verify(self, step: int, results: dict[int, P.Message]) -> None:
        """Every host that sent a checksum of the weights it started step `step` from must match ours."""
        sent = {r: m.fields.get("params_crc", -1) for r, m in results.items()}
        if all(c == -1 for c in sent.values()):
            return
        ours = checksum(self.store.params)
        self.checks += 1
        bad = [r for r, c in sent.items() if c != -1 and c != ours]
        if bad:
            who = ", ".join(self.coord.peers[r].describe() for r in bad)
            raise ReplicaMismatch(f"step {step}: the weights of {who} differ from the coordinator's "
                                  f"(checksum {sent[bad[0]]:#010x} != {ours:#010x})")
