"""The cross-host data plane, one agent's side: reduce-scatter and all-gather among the agents themselves.

The coordinator's star (every host's gradient in, the weights back out to every host) puts H × model bytes on the
coordinator's link each way per step. Here the bytes go host to host instead, and the coordinator keeps the decisions:

    1. every agent sums its local workers' gradients (local rank order, as before) and sends the part of that sum
       over host j's slice straight to host j (SCATTER): (H−1)/H of the model out, as much in, whatever H;
    2. each host sums its slice over the hosts in host order (host 0 first: exactly the star's rank-order sum, so
       the bits are the star's) and sends the coordinator its slice's block sums of squares (RESULT): the exact
       global norm needs nothing else;
    3. the coordinator answers every host with (lr, clip factor) (UPDATE); each host applies clip + SGD to its own
       slice, with its slice of the momentum, and sends the new weights of its slice to every other host (GATHER):
       (H−1)/H of the model again each way;
    4. each host then sends the coordinator its reduced slice (UPDATED): the coordinator applies the same update to
       its authoritative copy off the critical path (during the next step's compute) and, every
       dist.checksum_every steps, checks that every host's replica has the same bits as its own.

Slices are cut on optim.CHUNK boundaries, so the block sums of squares are the single process's and SGD is the same
elementwise arithmetic: every replica is bitwise the coordinator's. With the float16 wire a contribution is encoded
with its own power-of-two scale (wire.encode16) and an owner's new weights travel as its float16-rounded update
(wire.apply_update16, which the coordinator applies to its copy the same way).

Every agent binds one ROUTER (a CURVE server with a key pair of its own, whose ZAP handler admits only the run's
client key) and connects one DEALER to each other agent; the coordinator hands every agent the others' endpoints and
public keys over its own authenticated link (MESH). A wait on other hosts also watches the coordinator: a MESH (the
plane re-formed over the survivors of a lost host) or STOP ends it, and a slow host is named every few seconds.

Buffers sent zero-copy (a slice of the local sum, of the weights) are written again only after the receivers have
answered the coordinator for this step, so libzmq has long let go of them.
"""
from __future__ import annotations

import os
import time
import zlib

import numpy as np
import zmq

from .. import log
from ..optim import chunk_squares
from . import protocol as P
from .curve import CurveServer, RunKeys, client_setup
from .peer import PeerLink, Preempted, dealer
from .reduce import sum_in_order
from .wire import add16, apply_update16, encode16

WAIT_WARNING_EVERY_S = 10.0
EARLY_MAX = 1024  # messages kept for a later phase (a step brings 2 (H - 1)): a bound, not a working limit
POLL_MS = 50


def checksum(params: np.ndarray) -> int:
    """CRC-32 of the weights' bytes: equal replicas have equal sums, and a one-bit difference shows."""
    return zlib.crc32(memoryview(params).cast("B"))


class MeshLink:
    """This agent's sockets to the other agents and the waits on them."""

    def __init__(self, ctx: zmq.Context, address: str, keys: dict | None, run_id: str, index: int, host: str):
        self.ctx, self.run_id, self.index, self.host = ctx, run_id, index, host
        self.keys = keys
        self.log = log.get()
        self.server = None
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.key = ""
        if keys is not None:
            public, secret = zmq.curve_keypair()
            self.key = public.decode()
            self.server = CurveServer(ctx, RunKeys(self.key, secret.decode(), keys["client_public"],
                                                   keys["client_secret"]))
            self.server(self.sock)
        port = self.sock.bind_to_random_port(f"tcp://{address}")
        self.endpoint = f"tcp://{address}:{port}"
        self.out: dict[int, zmq.Socket] = {}
        self.hosts: list[list] = []  # [index, endpoint, key, lo, hi, host name] in host order
        self.mesh_id = -1
        self.lo = self.hi = 0
        self.early: list[P.Message] = []  # valid messages of a later phase than the one being waited for

    def configure(self, hosts: list[list], mesh_id: int) -> None:
        """Join the plane the coordinator formed: connect to every other agent, take this host's slice."""
        for s in self.out.values():
            s.close(0)
        self.out = {}
        self.hosts, self.mesh_id = hosts, mesh_id
        for index, endpoint, key, lo, hi, _ in hosts:
            if index == self.index:
                self.lo, self.hi = lo, hi
                continue
            curve = None
            if self.keys is not None:
                curve = client_setup({"server_public": key, "client_public": self.keys["client_public"],
                                      "client_secret": self.keys["client_secret"]})
            # a fresh identity per plane: a ROUTER ignores a newcomer under an identity it still knows
            self.out[index] = dealer(self.ctx, endpoint, f"mesh{self.index}-{os.getpid()}-{mesh_id}", curve)

    def name(self, index: int) -> str:
        return next((h[5] for h in self.hosts if h[0] == index), f"#{index}")

    def send(self, index: int, kind: P.Kind, step: int, attempt: int, arrays: dict, **fields) -> None:
        frames = P.encode(kind, self.run_id, step=step, rank=self.index, arrays=arrays, attempt=attempt,
                          mesh_id=self.mesh_id, src=self.index, **fields)
        self.out[index].send_multipart(frames, copy=False)

    def collect(self, kind: P.Kind, step: int, attempt: int, upstream: PeerLink) -> dict[int, P.Message]:
        """One `kind` message of this step attempt and plane from every other host, keyed by host index. The
        coordinator's link is watched meanwhile: MESH or STOP raises Preempted; anything else waits its turn."""
        waiting = {h[0] for h in self.hosts if h[0] != self.index}
        got: dict[int, P.Message] = {}
        self._take(kind, step, attempt, waiting, got)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(upstream.sock, zmq.POLLIN)
        since = last_warning = time.monotonic()
        while waiting:
            if upstream.idle is not None:
                upstream.idle()
            events = dict(poller.poll(POLL_MS))
            if upstream.sock in events:
                msg = upstream.poll_once()
                if msg is not None:
                    if msg.kind in (P.Kind.MESH, P.Kind.STOP):
                        raise Preempted(msg)
                    upstream.stash.append(msg)
            if self.sock in events:
                for _ in range(100):
                    try:
                        _, *frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = P.decode(frames, run=self.run_id)
                    except P.ProtocolError as e:
                        self.log.warning(f"host {self.host}: dropped a malformed message from another host: {e}")
                        continue
                    if msg.kind in (P.Kind.SCATTER, P.Kind.GATHER) and msg.fields["src"] == msg.rank:
                        self.early.append(msg)
            self._take(kind, step, attempt, waiting, got)
            now = time.monotonic()
            if waiting and now - last_warning > WAIT_WARNING_EVERY_S:
                last_warning = now
                self.log.warning(f"step {step}: host {self.host} waiting on "
                                 f"{', '.join(f'host {self.name(i)}' for i in sorted(waiting))}'s "
                                 f"{kind.name.lower()} for {now - since:.0f} s")
        return got

    def _take(self, kind: P.Kind, step: int, attempt: int, waiting: set[int], got: dict) -> None:
        """Move what this wait is for out of `early` (messages that came while this host was still busy with an
        earlier phase: a faster host's next scatter arrives during our gather); drop what can no longer be wanted
        (an old plane's, an abandoned attempt's, a past step's)."""
        keep = []
        for msg in self.early:
            f = msg.fields
            if f["mesh_id"] != self.mesh_id or (msg.step, f["attempt"]) < (step, attempt):
                continue
            if msg.kind is kind and msg.step == step and f["attempt"] == attempt and msg.rank in waiting:
                got[msg.rank] = msg
                waiting.discard(msg.rank)
            else:
                keep.append(msg)
        self.early = keep[-EARLY_MAX:]

    def close(self) -> None:
        for s in self.out.values():
            s.close(0)
        self.sock.close(0)
        if self.server is not None:
            self.server.stop()


class MeshReplica:
    """One host's replica of the weights and its slice of the momentum, and the step's four moves on them.
    params/buffers are the arrays this host's workers read (shared memory); red receives the reduced slice."""

    def __init__(self, mesh: MeshLink, opt, params: np.ndarray, buffers: np.ndarray, wire_dtype: str):
        self.mesh, self.opt, self.params, self.buffers = mesh, opt, params, buffers
        self.wire16 = wire_dtype == "float16"
        self.red = np.zeros_like(params)
        self.out16 = np.empty(params.size, np.float16) if self.wire16 else None

    def take_state(self, msg: P.Message) -> None:
        """MESH: join the plane and start from the coordinator's weights and this slice's momentum."""
        self.mesh.configure(msg.fields["hosts"], msg.fields["mesh_id"])
        np.copyto(self.params, msg.arrays["params"])
        np.copyto(self.buffers, msg.arrays["buffers"])
        self.opt.velocity[self.mesh.lo:self.mesh.hi] = msg.arrays["velocity"]

    def _encoded(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        return encode16(x) if self.wire16 else (x, 1.0)

    def reduce_scatter(self, gsum: np.ndarray, step: int, attempt: int, upstream: PeerLink) -> np.ndarray:
        """Send every other host its slice of this host's sum; sum this host's slice over all hosts in host order.
        Returns the block sums of squares of the reduced slice."""
        mesh = self.mesh
        for index, _, _, lo, hi, _ in mesh.hosts:
            if index != mesh.index:
                part, scale = self._encoded(gsum[lo:hi])
                mesh.send(index, P.Kind.SCATTER, step, attempt, {"grad": part}, lo=lo, hi=hi, scale=scale)
        got = mesh.collect(P.Kind.SCATTER, step, attempt, upstream)
        lo, hi = mesh.lo, mesh.hi
        parts, scales = [], []
        for index, *_ in mesh.hosts:  # host order: the star's rank-order sum
            if index == mesh.index:
                part, scale = self._encoded(gsum[lo:hi])  # our own share passes the same encoding
            else:
                m = got[index]
                part, scale = m.arrays["grad"], float(m.fields["scale"])
                if part.size != hi - lo or (m.fields["lo"], m.fields["hi"]) != (lo, hi):
                    raise SystemExit(f"host {mesh.host}: host {mesh.name(index)} sent a slice [{m.fields['lo']}, "
                                     f"{m.fields['hi']}) of {part.size}, expected [{lo}, {hi})")
            parts.append(part)
            scales.append(scale)
        sum_in_order(self.red[lo:hi], parts, scales)
        return chunk_squares(self.red[lo:hi])

    def update_gather(self, lr: float, scale: float, step: int, attempt: int, upstream: PeerLink) -> np.ndarray:
        """Clip + SGD on this host's slice, its new weights to every other host, theirs into our replica. Returns a
        copy of the reduced slice (the coordinator applies the same update to its copy)."""
        mesh = self.mesh
        lo, hi = mesh.lo, mesh.hi
        reduced = self.red[lo:hi].copy()  # SGD adds weight decay into red; the coordinator needs the plain sum
        prev = self.params[lo:hi].copy() if self.wire16 else None
        self.opt.step(self.params, self.red, lr, scale, lo, hi)
        if self.wire16:
            uscale = apply_update16(self.params[lo:hi], prev, self.out16[lo:hi])
            arrays = {"update": self.out16[lo:hi]}
        else:
            uscale, arrays = 1.0, {"params": self.params[lo:hi]}
        for index in mesh.out:
            mesh.send(index, P.Kind.GATHER, step, attempt, arrays, lo=lo, hi=hi, scale=uscale)
        for index, m in mesh.collect(P.Kind.GATHER, step, attempt, upstream).items():
            f = m.fields
            a, b = f["lo"], f["hi"]
            want = next((h[3], h[4]) for h in mesh.hosts if h[0] == index)
            arr = m.arrays.get("update", m.arrays.get("params"))
            if (a, b) != want or arr is None or arr.size != b - a:
                raise SystemExit(f"host {mesh.host}: host {mesh.name(index)} sent weights [{a}, {b}), "
                                 f"expected [{want[0]}, {want[1]})")
            if "update" in m.arrays:
                add16(self.params[a:b], arr, float(f["scale"]))
            else:
                np.copyto(self.params[a:b], arr)
        return reduced
