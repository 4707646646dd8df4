"""The mesh data plane, the coordinator's side (mesh.py tells the whole step).

The coordinator forms the plane (MESH: who owns which slice, where the others are, the state to start from) and
decides every step's (lr, clip factor) from the hosts' block sums of squares (UPDATE). The hosts hold the live
weights and, each for its slice, the momentum. Every dist.sync_every steps, and before anything that needs the
state here (a checkpoint, an evaluation, the end), the coordinator asks every host for its slice of the weights
and momentum and for a checksum of its whole copy of the weights (SYNC -> SYNCED): the slices become the
authoritative state, and every host's checksum must equal the checksum of that state, so the replicas are proven
bit-identical. The answers travel while the next step computes (nobody waits for them unless a checkpoint does), so
the coordinator's link carries 2/sync_every of the model per step, and the coordinator does no arithmetic on it.

When a host is lost, the steps since the last complete sync are redone over the survivors from the synced state
(the executor does that, `unsynced`): their batches, epochs and learning rates are kept here until a sync covers
them. Their results were already reported; the redo only rebuilds the state. The plane is then formed anew over
the survivors, with fresh slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import log
from ..config import Config
from ..executors import ExecutorFailure
from ..nn.params import ParamStore
from ..optim import SGD, add_blocks, checked_clip
from . import protocol as P
from .bulk import plane_secret
from .coordinator import Coordinator, WorkerFailure
from .mesh import checksum
from .mesh_layout import plane_slices, replicate_pays, sync_ranges
from .peers import PeerState


class ReplicaMismatch(ExecutorFailure):
    """A host's weights differ from the synced state: a bug or a corrupted host, never to be trained past."""


@dataclass
class Done:
    """A step the hosts applied: what it takes to redo it."""
    step: int
    attempt: int
    lr: float
    indices: np.ndarray
    epoch: int


@dataclass
class Sync:
    """A SYNC in flight: the answers so far, keyed by host rank."""
    step: int
    attempt: int
    slices: dict[int, list[tuple[int, int]]]  # what each host uploads (mesh_layout.sync_ranges)
    got: dict[int, P.Message] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.got) == len(self.slices)


class MeshPlane:
    def __init__(self, coord: Coordinator, store: ParamStore, opt: SGD, cfg: Config):
        self.coord, self.store, self.opt, self.cfg = coord, store, opt, cfg
        self.log = log.get()
        self.mesh_id = 0
        self.formed: tuple[int, ...] = ()
        self.slices: dict[int, tuple[int, int]] = {}
        self.sync_ranges: dict[int, list[tuple[int, int]]] = {}  # what each host uploads at a SYNC
        self.done: list[Done] = []  # applied by the hosts, not yet in the synced state
        self.sync: Sync | None = None
        self.every = max(cfg.dist.sync_every, 1)
        self.checks = 0  # syncs whose replica checksums were compared
        self.replicate: tuple[int, int] | None = None  # this plane: [w0, w1) every host updates itself
        self.warned_gemm = False

    def ensure(self, step: int, attempt: int) -> None:
        """Form the plane over the live hosts unless it is formed over exactly them: slices, peers' addresses and
        keys, and the synced state to every host."""
        ranks = tuple(p.rank for p in self.coord.active())
        if ranks == self.formed:
            return
        lost = [p for p in self.coord.peers.values() if p.rank in self.formed and p.rank not in ranks]
        if self.done and lost:  # a host was lost where nobody waited on it: the steps since the sync are redone first
            raise WorkerFailure(lost)
        if self.done and not self.settle():  # a host joined: the state it starts from is the hosts' state now
            raise WorkerFailure([p for p in self.coord.peers.values() if p.rank in self.formed
                                 and p.state is PeerState.DEAD])
        ranks = tuple(p.rank for p in self.coord.active())  # (settling lets another host become ready)
        self.sync = None
        replicate = self.replicate = self.replicated(ranks)
        cut = plane_slices(self.store.num_params, len(ranks), replicate)
        self.slices = dict(zip(ranks, cut))
        self.sync_ranges = dict(zip(ranks, sync_ranges(cut, replicate)))
        self.mesh_id += 1
        peers = self.coord.peers
        hosts = [[r, peers[r].mesh_endpoint, peers[r].mesh_key, lo, hi, peers[r].host]
                 for r, (lo, hi) in self.slices.items()]
        # dist.bulk_cipher = "aes-gcm": the plane's secret, only over this CURVE link (a fresh one per plane)
        sealed = {"bulk_secret": plane_secret()} if self.cfg.dist.bulk_cipher == "aes-gcm" else {}
        for r, (lo, hi) in self.slices.items():
            arrays = {"params": self.store.params, "buffers": self.store.buffers, "velocity": self.opt.velocity[lo:hi]}
            if replicate:  # every host updates that layer: it starts from the whole layer's momentum
                arrays["velocity_w"] = self.opt.velocity[replicate[0]:replicate[1]]
            self.coord.send(peers[r], P.Kind.MESH, step=step, attempt=attempt, mesh_id=self.mesh_id, hosts=hosts,
                            **sealed, **({"replicate": list(replicate)} if replicate else {}), arrays=arrays)
        self.coord.collect(step, attempt, list(ranks), P.Kind.MESHED)
        self.formed = ranks
        mb = self.store.num_params * 4 / len(ranks) / 1e6
        self.log.info(f"mesh data plane {self.mesh_id} over {len(ranks)} hosts "
                      f"({', '.join(peers[r].host for r in ranks)}): {mb:.1f} MB slices"
                      + (f"; every host updates the factored Linear [{replicate[0]}, {replicate[1]}) itself"
                         if replicate else ""))

    def replicated(self, ranks: tuple[int, ...]) -> tuple[int, int] | None:
        """[w0, w1) of the factored Linear when every host of this plane computes its whole weight gradient from
        every host's factors and updates it (dist.factor_update, mesh_layout.replicate_pays): all hosts factor the same
        layer, their GEMMs give the same bits (the same CPU model, BLAS build, kernels and threads: each host
        runs every owner's GEMM itself, and replicas that differ would stop the run at the next SYNC), and it pays
        for this batch and number of hosts. Decided per plane, by the coordinator alone."""
        peers = self.coord.peers
        factors = {peers[r].mesh_factor for r in ranks}
        if len(factors) != 1 or not next(iter(factors)):
            return None
        gemms = {peers[r].mesh_gemm for r in ranks}
        if len(gemms) != 1:
            if self.cfg.dist.factor_update != "owners" and not self.warned_gemm:
                self.warned_gemm = True
                self.log.warning("the hosts' GEMMs may round differently (CPU models or BLAS builds or threads differ:"
                                 " " + ", ".join(f"{peers[r].host} {peers[r].mesh_gemm}" for r in ranks)[:400]
                                 + "): each owner updates its rows of the factored Linear (dist.factor_update owners;"
                                 " a --replay-layout of this run needs --dist.factor_update=owners too)")
            return None
        w0, K, F = next(iter(factors))
        d = self.cfg.dist
        if not replicate_pays(self.cfg.train.batch_size, len(ranks), K, F, 2 if d.wire_dtype == "float16" else 4,
                              d.factor_update):
            return None
        return w0, w0 + K * F

    def decide(self, step: int, attempt: int, results: dict[int, P.Message], lr: float, indices: np.ndarray,
               epoch: int) -> float:
        """The exact global norm from the hosts' block sums (slice order is block order), the clip factor, UPDATE
        to every host; every sync_every steps a SYNC after it (answered while the next step computes). Returns the
        norm."""
        squares = np.concatenate([results[r].arrays["squares"] for r in self.formed])
        norm = math.sqrt(add_blocks(squares))
        scale = checked_clip(norm, self.cfg.train.clip_norm, step)
        for r, (lo, hi) in self.slices.items():
            self.coord.send(self.coord.peers[r], P.Kind.UPDATE, step=step, attempt=attempt, lo=lo, hi=hi, lr=lr,
                            scale=scale, src=-1)
        self.done.append(Done(step, attempt, lr, indices, epoch))
        self._apply_sync()
        if len(self.done) >= self.every and self.sync is None:
            self._request_sync()
        return norm

    def _request_sync(self) -> None:
        last = self.done[-1]
        self.sync = Sync(last.step, last.attempt, dict(self.sync_ranges))
        for r, ranges in self.sync_ranges.items():
            self.coord.send(self.coord.peers[r], P.Kind.SYNC, step=last.step, attempt=last.attempt,
                            ranges=[list(x) for x in ranges])

    def on_message(self, msg: P.Message) -> None:
        """A round's side channel: the answers to a SYNC in flight."""
        s = self.sync
        if msg.kind is not P.Kind.SYNCED or s is None or msg.step != s.step or msg.fields["attempt"] != s.attempt:
            return
        ranges = s.slices.get(msg.rank)
        a = msg.arrays
        size = sum(hi - lo for lo, hi in ranges or [])
        if ranges is None or msg.fields.get("ranges") != [list(x) for x in ranges] or any(
                k not in a or a[k].dtype != np.float32 or a[k].size != size for k in ("params", "velocity")):
            self.coord._dropped(f"dropped SYNCED from rank {msg.rank}: not the ranges {ranges} asked for, in float32")
            return
        s.got[msg.rank] = msg

    def _apply_sync(self) -> None:
        """A complete sync becomes the state: the slices into the store and the optimizer, every host's checksum
        against it, and the steps it covers out of the redo list."""
        s = self.sync
        if s is None or not s.complete():
            return
        for r, ranges in s.slices.items():
            at = 0
            for lo, hi in ranges:
                self.store.params[lo:hi] = s.got[r].arrays["params"][at:at + hi - lo]
                self.opt.velocity[lo:hi] = s.got[r].arrays["velocity"][at:at + hi - lo]
                at += hi - lo
        ours = checksum(self.store.params)
        bad = [r for r, m in s.got.items() if m.fields["params_crc"] != ours]
        # a replicated layer's momentum lives on every host too: each copy against the owners' (synced) one
        v_ours = checksum(self.opt.velocity[self.replicate[0]:self.replicate[1]]) if self.replicate else None
        v_bad = [r for r, m in s.got.items() if v_ours is not None and m.fields.get("velocity_crc") != v_ours]
        self.sync = None
        self.done = [d for d in self.done if d.step > s.step]
        self.checks += 1
        problems = []
        if bad:
            who = ", ".join(self.coord.peers[r].describe() for r in bad)
            problems.append(f"the weights of {who} differ from the synced state (checksum "
                            f"{s.got[bad[0]].fields['params_crc']:#010x} != {ours:#010x})")
        if v_bad:
            who = ", ".join(self.coord.peers[r].describe() for r in v_bad)
            problems.append(f"the momentum of the replicated layer on {who} differs from the synced state "
                            f"(checksum {s.got[v_bad[0]].fields.get('velocity_crc')} != {v_ours:#010x})")
        if problems:
            raise ReplicaMismatch(f"step {s.step}: " + "; ".join(problems))

    def settle(self) -> bool:
        """The hosts' state after the last step into the coordinator's store (a sync, waited for). False when a
        host is lost before it answered (the store stays at the last complete sync; `unsynced` recovers)."""
        if not self.done:
            return True
        last = self.done[-1]
        if self.sync is None or self.sync.step != last.step:
            self.sync = None  # an older sync still in flight is superseded by this one
            self._request_sync()
        s = self.sync
        missing = [r for r in s.slices if r not in s.got]
        if missing:
            try:
                got = self.coord.collect(s.step, s.attempt, missing, P.Kind.SYNCED, side=self.on_message)
            except WorkerFailure:
                return False
            for m in got.values():
                self.on_message(m)
        if not s.complete():
            return False
        self._apply_sync()
        return True

    def unsynced(self) -> list[Done]:
        """The steps since the last complete sync, handed to the caller to redo over the survivors (oldest first);
        the plane is formed again from the synced state before the first of them."""
        done, self.done = self.done, []
        self.sync = None
        self.formed = ()
        return done
