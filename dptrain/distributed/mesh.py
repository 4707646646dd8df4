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
    4. every dist.sync_every steps the coordinator takes each host's slice of the weights and momentum as its
       authoritative state and checks every host's whole copy against it by checksum (SYNC; mesh_plane.py).

Slices are cut on optim.CHUNK boundaries, so the block sums of squares are the single process's and SGD is the same
elementwise arithmetic: every replica is bitwise the coordinator's. With the float16 wire a contribution is encoded
with its own power-of-two scale (wire.encode16) and an owner's new weights travel as its float16-rounded update
(wire.apply_update16: the owner keeps exactly what the others rebuild).

Every agent binds one ROUTER (a CURVE server with a key pair of its own, whose ZAP handler admits only the run's
client key) and connects one DEALER to each other agent; the coordinator hands every agent the others' endpoints and
public keys over its own authenticated link (MESH). A wait on other hosts also watches the coordinator: a MESH (the
plane re-formed over the survivors of a lost host) or STOP ends it, and a slow host is named every few seconds.

Buffers sent zero-copy (a slice of the local sum, of the weights) are written again only after the receivers have
answered the coordinator for this step, so libzmq has long let go of them.
"""
from __future__ import annotations

import os
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zmq

from .. import log
from ..optim import chunk_squares
from . import protocol as P
from .bulk import SECRET_BYTES, TAG, BulkError, Opener, OtherPlane, Sealer
from .curve import CurveServer, RunKeys, client_setup
from .mesh_layout import dw_span, factor_span, gather_pieces, scatter_pieces
from .peer import PeerLink, dealer
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

    def __init__(self, ctx: zmq.Context, address: str, keys: dict | None, run_id: str, index: int, host: str,
                 max_frame: int, cipher: str = "curve", cipher_threads: int = 1):
        self.ctx, self.run_id, self.index, self.host = ctx, run_id, index, host
        self.keys = keys
        # dist.bulk_cipher = "aes-gcm" (with the run's keys): these sockets drop CURVE and every message on them is
        # sealed with AES-256-GCM under keys from the MESH message (bulk.py); without keys nothing is encrypted
        self.sealed = keys is not None and cipher == "aes-gcm"
        self.sealers: dict[int, Sealer] = {}
        self.opener: Opener | None = None
        # dist.cipher_threads > 1: messages are sealed and opened on that many threads (OpenSSL runs without the GIL),
        # sent and taken in their order on this one (ZeroMQ sockets are not thread-safe; counters only go upwards)
        self.pool = ThreadPoolExecutor(cipher_threads, "seal") if self.sealed and cipher_threads > 1 else None
        self.pending: deque[tuple[Future, zmq.Socket]] = deque()  # sealing on the pool, to be sent in this order
        # CPU-seconds this host spent sealing and opening bulk frames (AES-GCM) since it started; 0 with CURVE,
        # which libzmq runs on its I/O thread (bench --hosts reads that thread's time)
        self.cipher_cpu_s = 0.0
        self.dropped = 0  # messages refused on this socket: malformed, or sealed and not authentic
        self.drop_log = log.DropLog(P.DROP_LOG_BURST, P.DROP_LOG_WINDOW_S, P.DROP_LINE_CHARS)  # a flood: a few lines
        self.log = log.get()
        self.server = None
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # session.frame_limit; a sealed frame is TAG bytes longer than the array it holds
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame + (TAG if self.sealed else 0))
        self.key = ""
        if keys is not None and not self.sealed:
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

    def configure(self, hosts: list[list], mesh_id: int, secret: bytes | None = None) -> None:
        """Join the plane the coordinator formed: connect to every other agent, take this host's slice. `secret`:
        the plane's bulk secret (sealed sockets only)."""
        self._settle_pending()  # the old plane's messages still being sealed: never sent
        for s in self.out.values():
            s.close(0)
        self.out = {}
        self.hosts, self.mesh_id = hosts, mesh_id
        if self.sealed:
            if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
                raise SystemExit(f"host {self.host}: the coordinator sent no bulk key for plane {mesh_id} "
                                 f"(dist.bulk_cipher = 'aes-gcm' needs the coordinator of this version)")
            others = [h[0] for h in hosts if h[0] != self.index]
            self.sealers = {j: Sealer(secret, self.run_id, mesh_id, self.index, j) for j in others}
            self.opener = Opener(secret, self.run_id, mesh_id, self.index, others)
        for index, endpoint, key, lo, hi, _ in hosts:
            if index == self.index:
                self.lo, self.hi = lo, hi
                continue
            curve = None
            if self.keys is not None and not self.sealed:
                curve = client_setup({"server_public": key, "client_public": self.keys["client_public"],
                                      "client_secret": self.keys["client_secret"]})
            # a fresh identity per plane: a ROUTER ignores a newcomer under an identity it still knows; 64 random
            # bits, so that nobody can take it first on a socket without CURVE
            self.out[index] = dealer(self.ctx, endpoint,
                                     f"mesh{self.index}-{os.getpid()}-{mesh_id}-{secrets.token_hex(8)}", curve,
                                     max_frame=P.DEFAULT_LIMITS.max_header_bytes)  # sends only: nothing comes back

    def name(self, index: int) -> str:
        return next((h[5] for h in self.hosts if h[0] == index), f"#{index}")

    def send(self, index: int, kind: P.Kind, step: int, attempt: int, arrays: dict, **fields) -> None:
        frames = P.encode(kind, self.run_id, step=step, rank=self.index, arrays=arrays, attempt=attempt,
                          mesh_id=self.mesh_id, src=self.index, **fields)
        sock = self.out[index]
        if not self.sealed:
            sock.send_multipart(frames, copy=False)
            return
        sealer = self.sealers[index]  # sealed (on the pool if any); sent in order as each is done
        self.pending.append((self._run(sealer.seal_reserved, sealer.reserve(frames), frames), sock))
        self.flush(wait=False)

    def _run(self, fn: Callable, *args) -> Future:
        """fn(*args) on the cipher pool, or here and now without one (a Future either way)."""
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to whoever takes the result, as the pool would
            done.set_exception(e)
        return done

    def flush(self, wait: bool = True) -> None:
        """Send the sealed messages in the order they were given (wait: all of them, else those done at the head
        of the queue). Their plaintext buffers may change once this has waited."""
        while self.pending and (wait or self.pending[0][0].done()):
            job, sock = self.pending.popleft()
            frames, cpu = job.result()
            self.cipher_cpu_s += cpu
            sock.send_multipart(frames, copy=False)

    def _settle_pending(self) -> None:
        while self.pending:
            job, _ = self.pending.popleft()
            try:
                job.result()
            except Exception:  # noqa: BLE001 - a message of a plane being left: it is dropped either way
                pass

    def collect(self, kind: P.Kind, step: int, attempt: int, upstream: PeerLink, waiting: set[tuple[int, int]],
                take: Callable[[P.Message], None], block: bool = True) -> None:
        """take(msg) for each `kind` message of this step attempt and plane keyed (sending host, lo) in `waiting`,
        as it comes (its bytes are used while the rest is still on the wire). The coordinator's link is watched
        meanwhile: MESH or STOP raises Preempted; anything else waits its turn. A host late by
        WAIT_WARNING_EVERY_S is named, with the piece it owes. block=False: only what is here now (one pass)."""
        self.flush(wait=block)  # whatever this host still owes the others goes out before it waits on them
        got: list[P.Message] = []
        self._take(kind, step, attempt, waiting, got)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(upstream.sock, zmq.POLLIN)
        since = last_warning = time.monotonic()
        while waiting:
            if block and upstream.idle is not None:  # (not inside the agent's own round: it serves its workers)
                upstream.idle()
            events = dict(poller.poll(POLL_MS if block else 0))
            if upstream.sock in events:
                upstream.watch((P.Kind.MESH, P.Kind.STOP))
            if self.sock in events:
                self._drain()
            self._take(kind, step, attempt, waiting, got)
            for msg in got:
                take(msg)
            got.clear()
            if not block:
                return
            now = time.monotonic()
            if waiting and now - last_warning > WAIT_WARNING_EVERY_S:
                last_warning = now
                late = sorted(waiting)
                self.log.warning(f"step {step}: host {self.host} waiting on host {self.name(late[0][0])}'s "
                                 f"{kind.name.lower()} of [{late[0][1]}, ...) for {now - since:.0f} s"
                                 + (f" ({len(late)} pieces from {len({h for h, _ in late})} host(s) missing)"
                                    if len(late) > 1 else ""))
        for msg in got:
            take(msg)

    def _drain(self) -> None:
        batch = []
        for _ in range(1000):
            try:
                via, *frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            batch.append((via.bytes, frames))
        opened = self._open_all(batch) if self.sealed else [(None, frames, None) for _, frames in batch]
        for sender, frames, error in opened:
            try:
                if error is not None:
                    raise error
                msg = P.decode(frames, run=self.run_id)
                if sender is not None and (msg.rank != sender or msg.fields.get("src") != sender
                                           or msg.fields.get("mesh_id") != self.mesh_id):
                    raise BulkError(f"host {sender} sealed a message of host {msg.rank}, plane "
                                    f"{msg.fields.get('mesh_id')}")
            except OtherPlane:
                continue
            except (P.ProtocolError, BulkError) as e:
                self.dropped += 1
                self.drop_log(f"host {self.host}: dropped a message from another host ({self.dropped} so far): {e}")
                continue
            if msg.kind in (P.Kind.SCATTER, P.Kind.GATHER, P.Kind.FACTORS) and msg.fields["src"] == msg.rank:
                self.early.append(msg)

    def _open_all(self, batch: list[tuple[bytes, list]]) -> list[tuple[int | None, list, Exception | None]]:
        """Sealed messages received together (each with the connection it came over), opened side by side on the
        cipher pool if any: [(sender, plaintext frames, None) or (None, frames, the error)], in arrival order.
        Envelopes are checked and the replay window moved here, in that order; only decryption runs on the pool."""
        opener = self.opener
        if opener is None:
            return [(None, f, BulkError("sealed message before this host joined a plane")) for _, f in batch]
        jobs = []
        for via, frames in batch:
            try:
                sender, c0, env = opener.check(frames, via)
                jobs.append((via, frames, sender, c0, self._run(opener.decrypt, sender, c0, env, frames), None))
            except (OtherPlane, BulkError) as e:
                jobs.append((via, frames, None, None, None, e))
        out = []
        for via, frames, sender, c0, job, error in jobs:
            if error is None:
                try:
                    plain, cpu = job.result()
                    self.cipher_cpu_s += cpu
                    opener.commit(sender, c0, len(frames), via)
                    out.append((sender, plain, None))
                    continue
                except BulkError as e:
                    error = e
            out.append((None, frames, error))
        return out

    def _take(self, kind: P.Kind, step: int, attempt: int, waiting: set[tuple[int, int]], got: list) -> None:
        """Move what this wait is for out of `early` (messages that came while this host was still busy with an
        earlier phase: a faster host's next scatter arrives during our gather); drop what can no longer be wanted
        (an old plane's, an abandoned attempt's, a past step's)."""
        keep = []
        for msg in self.early:
            f = msg.fields
            if f["mesh_id"] != self.mesh_id or (msg.step, f["attempt"]) < (step, attempt):
                continue
            key = (msg.rank, f["lo"])
            if msg.kind is kind and msg.step == step and f["attempt"] == attempt and key in waiting:
                got.append(msg)
                waiting.discard(key)
            else:
                keep.append(msg)
        self.early = keep[-EARLY_MAX:]

    def close(self) -> None:
        self._settle_pending()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for s in self.out.values():
            s.close(0)
        self.sock.close(0)
        if self.server is not None:
            self.server.stop()


class MeshReplica:
    """One host's replica of the weights and its slice of the momentum, and the step's moves on them.
    params/buffers are the arrays this host's workers read (shared memory); `param_starts` are the offsets where the
    model's top-level layers begin (Model.param_starts): the flat buffer is cut at those, at the slice bounds and
    every mesh_layout.PIECE elements into fixed pieces, so what travels (and, with float16, how it is scaled) never depends on
    timing."""

    def __init__(self, mesh: MeshLink, opt, params: np.ndarray, buffers: np.ndarray, wire_dtype: str,
                 param_starts: list[int | None], factor: tuple | None = None):
        self.mesh, self.opt, self.params, self.buffers = mesh, opt, params, buffers
        self.wire16 = wire_dtype == "float16"
        # dist.factored: (offset, K, F, x slots, dy slots) of the Linear whose weight gradient travels as factors
        self.factor = factor
        self.w = (factor[0], factor[0] + factor[1] * factor[2]) if factor else (0, 0)
        self.param_starts = list(param_starts) + (list(self.w) if factor else [])
        self.red = np.zeros_like(params)
        self.out16 = np.empty(params.size, np.float16) if self.wire16 else None
        self.pieces: list[tuple[int, int, int]] = []  # (lo, hi, owner's host index), in flat order
        self.replicate = False  # this plane: every host updates the factored Linear itself (no all-gather of it)
        self.parts = np.empty((0, 0), np.float32)  # (hosts, this slice): every host's contribution, decoded
        self.position: dict[int, int] = {}  # host index -> row of parts (host order)
        # dist.gather_overlap: the all-gather still arriving, (step, attempt, pieces missing, take), and the gate the
        # workers read (int64 [generation, weights final up to this offset]; None: no workers wait on it)
        self.gathering: tuple | None = None
        self.missing: list[int] = []
        self.gate: np.ndarray | None = None

    def take_state(self, msg: P.Message) -> None:
        """MESH: join the plane and start from the coordinator's weights and this slice's momentum."""
        mesh = self.mesh
        mesh.configure(msg.fields["hosts"], msg.fields["mesh_id"], msg.fields.get("bulk_secret"))
        np.copyto(self.params, msg.arrays["params"])
        np.copyto(self.buffers, msg.arrays["buffers"])
        self.opt.velocity[mesh.lo:mesh.hi] = msg.arrays["velocity"]
        # dist.factor_update: this plane's hosts each compute and update the whole factored Linear ([w0, w1))
        rep = msg.fields.get("replicate")
        self.replicate = self.factor is not None and rep == list(self.w)
        if rep and not self.replicate:
            raise SystemExit(f"host {mesh.host}: plane {mesh.mesh_id} replicates weights [{rep[0]}, {rep[1]}), but "
                             f"this host's factored Linear is {list(self.w) if self.factor else 'none'}")
        if self.replicate:
            self.opt.velocity[self.w[0]:self.w[1]] = msg.arrays["velocity_w"]
        self.pieces = scatter_pieces(self.param_starts, self.params.size, [(h[0], h[3], h[4]) for h in mesh.hosts])
        self.position = {h[0]: k for k, h in enumerate(mesh.hosts)}
        self.parts = np.empty((len(mesh.hosts), mesh.hi - mesh.lo), np.float32)

    # ---- reduce-scatter, overlapped with backward ---------------------------------------------------------------
    def begin(self, step: int, attempt: int, ranks: list[int], slots: np.ndarray, gsum: np.ndarray,
              counts: dict[int, int] | None = None) -> None:
        """A step starts on this host's workers `ranks` (local, in order; `counts`: their shard sizes), whose
        gradients land in `slots`."""
        self.step, self.attempt, self.ranks, self.slots, self.gsum = step, attempt, ranks, slots, gsum
        self.counts = counts or {}
        self.factors_sent = self.factor is None
        self.fparts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # host index -> (x, dy) for our rows
        self.frontier = dict.fromkeys(ranks, self.params.size)
        self.sent_from = self.params.size  # gsum[sent_from:] is summed and on its way
        self.first_sent = 0.0  # wall-clock time the first piece went out (while backward went on)

    def on_bucket(self, msg: P.Message) -> None:
        """A worker's BUCKET (its gradient from ready_from on is final): once every local worker is past a piece,
        sum the piece over them and send it to its owner while backward goes on."""
        if msg.kind is not P.Kind.BUCKET or msg.rank not in self.frontier or msg.step != self.step \
                or msg.fields["attempt"] != self.attempt:
            return
        self.frontier[msg.rank] = min(self.frontier[msg.rank], int(msg.fields["ready_from"]))
        ready = max(max(self.frontier.values()), 0)  # the slowest worker's frontier: all are past it
        if ready < self.sent_from:
            self._push(ready, self.sent_from)

    def _push(self, a: int, b: int) -> None:
        """Local sum of [a, b) (local rank order) and its pieces on their way ([a, b) is a union of pieces)."""
        mesh, gsum = self.mesh, self.gsum
        if not self.first_sent:
            self.first_sent = time.time()
        for x0, x1 in self._outside_w(a, b):
            if self.ranks:
                sum_in_order(gsum[x0:x1], [self.slots[r][x0:x1] for r in self.ranks])
            else:  # no image for this host this step: it contributes zeros and still owns its slice
                gsum[x0:x1] = 0.0
        if not self.factors_sent and a <= self.w[0]:
            self._send_factors()
        for lo, hi, owner in self.pieces:
            if lo < a or hi > b or self.w[0] <= lo < self.w[1]:
                continue
            part, scale = encode16(gsum[lo:hi]) if self.wire16 else (gsum[lo:hi], 1.0)
            if owner == mesh.index:  # our own share passes the same encoding
                self._place(mesh.index, lo, part, scale)
            else:
                mesh.send(owner, P.Kind.SCATTER, self.step, self.attempt, {"grad": part}, lo=lo, hi=hi,
                          scale=scale)
        mesh.flush()  # sealed side by side (dist.cipher_threads), on the wire while backward goes on
        self.sent_from = a

    def _outside_w(self, a: int, b: int) -> list[tuple[int, int]]:
        """[a, b) without the factored Linear's weights."""
        w0, w1 = self.w
        if w0 == w1:
            return [(a, b)]
        return [r for r in ((a, min(b, w0)), (max(a, w1), b)) if r[0] < r[1]]

    def _send_factors(self) -> None:
        """The host's samples' inputs (B_h x K) and output gradients (B_h x F) of the factored Linear, its workers in
        local rank order, to every owner of rows of its weights: just the columns of x that owner needs."""
        mesh, (w0, K, F, fx, fdy) = self.mesh, self.factor
        x_h, dy_h = np.zeros((0, K), np.float32), np.zeros((0, F), np.float32)
        if self.ranks:
            x_h = np.concatenate([fx[r, :self.counts[r]] for r in self.ranks])
            dy_h = np.concatenate([fdy[r, :self.counts[r]] for r in self.ranks])
        if self.replicate:  # every host computes all of dW: all of x to everyone
            self.fparts[mesh.index] = (x_h, dy_h)
            for index in mesh.out:
                mesh.send(index, P.Kind.FACTORS, self.step, self.attempt, {"x": x_h, "dy": dy_h}, lo=w0,
                          hi=w0 + K * F)
            mesh.flush()
            self.factors_sent = True
            return
        for index, _, _, lo, hi, _ in mesh.hosts:
            span = factor_span(w0, K, F, lo, hi)
            if span is None:
                continue
            a, b, k0, k1 = span
            x = np.ascontiguousarray(x_h[:, k0:k1])
            if index == mesh.index:
                self.fparts[index] = (x, dy_h)
            else:
                mesh.send(index, P.Kind.FACTORS, self.step, self.attempt, {"x": x, "dy": dy_h}, lo=a, hi=b)
        mesh.flush()
        self.factors_sent = True

    def _factored_rows(self, upstream: PeerLink) -> None:
        """Our rows of the factored Linear's weight gradient, dW = X^T dY over the whole batch (every host's samples
        in host order): one GEMM instead of summing H hosts' full-size contributions."""
        mesh, (w0, K, F, _, _) = self.mesh, self.factor
        if self.replicate:
            self._replicated_rows(upstream)
            return
        span = factor_span(w0, K, F, mesh.lo, mesh.hi)
        if span is None:
            return
        a, b, k0, k1 = span
        x, dy = self._gather_factors(upstream, a, b, k1 - k0)
        self.red[a:b] = dw_span(x, dy, w0, F, span)

    def _gather_factors(self, upstream: PeerLink, a: int, b: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Every other host's FACTORS for [a, b) (x with `cols` columns, dy with F), with ours, in host order."""
        mesh, F = self.mesh, self.factor[2]

        def take(m: P.Message) -> None:
            x, dy = m.arrays["x"], m.arrays["dy"]
            if m.fields["hi"] != b or x.ndim != 2 or x.shape[1] != cols or dy.shape != (x.shape[0], F):
                raise SystemExit(f"host {mesh.host}: host {mesh.name(m.rank)} sent factors of shape {x.shape}, "
                                 f"{dy.shape} for [{a}, {m.fields['hi']}), expected (n, {cols}), (n, {F}) for "
                                 f"[{a}, {b})")
            self.fparts[m.rank] = (x, dy)
        mesh.collect(P.Kind.FACTORS, self.step, self.attempt, upstream, {(src, a) for src in mesh.out}, take)
        order = [h[0] for h in mesh.hosts]
        return (np.concatenate([self.fparts[h][0] for h in order]),
                np.concatenate([self.fparts[h][1] for h in order]))

    def _replicated_rows(self, upstream: PeerLink) -> None:
        """dist.factor_update replicated: the whole factored Linear's weight gradient from every host's factors,
        owner by owner, with the very GEMM each owner would run on its rows (the same inputs, shapes and columns of
        X: every host gets the same bits, which the replay reproduces; the plane's slices are cut as
        mesh_layout.plane_slices says, so against dist.factor_update = owners the GEMM shapes, hence the groupings, differ)."""
        mesh, (w0, K, F, _, _) = self.mesh, self.factor
        x, dy = self._gather_factors(upstream, w0, w0 + K * F, K)
        for h in mesh.hosts:
            span = factor_span(w0, K, F, h[3], h[4])
            if span is not None:
                a, b, k0, k1 = span
                self.red[a:b] = dw_span(np.ascontiguousarray(x[:, k0:k1]), dy, w0, F, span)

    def _place(self, src: int, lo: int, part: np.ndarray, scale: float) -> None:
        row = self.parts[self.position[src], lo - self.mesh.lo:lo - self.mesh.lo + part.size]
        if part.dtype == np.float16:
            add16(row, part, scale, first=True)  # × a power of two: exact
        else:
            np.copyto(row, part)

    def finish_scatter(self, upstream: PeerLink) -> np.ndarray:
        """After the local round: send what is left, take every other host's pieces of our slice, sum them in host
        order (host 0 first: the star's rank-order sum). Returns the slice's block sums of squares."""
        mesh = self.mesh
        if self.sent_from > 0:
            self._push(0, self.sent_from)
        mine = [(lo, hi) for lo, hi, owner in self.pieces if owner == mesh.index and not self.w[0] <= lo < self.w[1]]
        waiting = {(src, lo) for src in mesh.out for lo, _ in mine}
        sizes = dict(mine)

        def take(m: P.Message) -> None:
            src, lo, part = m.rank, m.fields["lo"], m.arrays["grad"]
            if m.fields["hi"] != sizes[lo] or part.size != sizes[lo] - lo:
                raise SystemExit(f"host {mesh.host}: host {mesh.name(src)} sent a piece [{lo}, {m.fields['hi']}) "
                                 f"of {part.size}, expected [{lo}, {sizes[lo]})")
            self._place(src, lo, part, float(m.fields["scale"]))
        mesh.collect(P.Kind.SCATTER, self.step, self.attempt, upstream, waiting, take)
        lo, hi = mesh.lo, mesh.hi
        for a, b in self._outside_w(lo, hi):
            sum_in_order(self.red[a:b], [p[a - lo:b - lo] for p in self.parts])
        if self.factor is not None:
            self._factored_rows(upstream)
        return chunk_squares(self.red[lo:hi])

    # ---- update and all-gather --------------------------------------------------------------------------------
    def update_gather(self, lr: float, scale: float, step: int, attempt: int, upstream: PeerLink,
                      defer: bool = False) -> None:
        """Clip + SGD on this host's slice, its new weights to every other host, theirs into our replica; piece by
        piece (gather_pieces), so the first pieces are on the wire while the next are computed, and each piece
        received is applied while the rest is on its way. Replicated (dist.factor_update): the factored Linear's
        pieces of every slice are updated here, as their owners do, and none of them travels, so none is rounded to
        the float16 wire either (every host computes the same float32 update). defer (dist.gather_overlap): return
        once this host's own pieces are out; the others' are taken by pump() and finish_gather(), and the gate
        says how far from the start the weights are final meanwhile (open_gate)."""
        mesh = self.mesh
        cuts = self.w if self.factor else ()
        for a, b in gather_pieces(mesh.lo, mesh.hi, cuts):
            if self._stays(a):
                self._update_piece(a, b, lr, scale, wire16=False)
                continue
            uscale, arrays = self._update_piece(a, b, lr, scale)
            for index in mesh.out:
                mesh.send(index, P.Kind.GATHER, step, attempt, arrays, lo=a, hi=b, scale=uscale)
        ends = {}
        for h in mesh.hosts:
            if h[0] == mesh.index:
                continue
            for a, b in gather_pieces(h[3], h[4], cuts):
                if self._stays(a):
                    self._update_piece(a, b, lr, scale, wire16=False)
                else:
                    ends[(h[0], a)] = b

        def take(m: P.Message) -> None:
            a, b = m.fields["lo"], ends[(m.rank, m.fields["lo"])]
            arr = m.arrays.get("update", m.arrays.get("params"))
            if m.fields["hi"] != b or arr is None or arr.size != b - a:
                raise SystemExit(f"host {mesh.host}: host {mesh.name(m.rank)} sent weights [{a}, {m.fields['hi']}),"
                                 f" expected [{a}, {b})")
            if "update" in m.arrays:
                add16(self.params[a:b], arr, float(m.fields["scale"]))
            else:
                np.copyto(self.params[a:b], arr)
            self._arrived(a)
        self.gathering = (step, attempt, set(ends), take)
        self.missing = sorted(a for _, a in ends)
        self._arrived(None)
        if defer:
            mesh.flush()  # this host's pieces go out now: nothing else might wake it to send them
        else:
            self.finish_gather(upstream)

    def _arrived(self, a: int | None) -> None:
        """Piece [a, ...) of the all-gather is in: the weights are final below the first piece still missing."""
        if a is not None:
            self.missing.remove(a)
        if self.gate is not None:
            self.gate[1] = self.missing[0] if self.missing else self.params.size

    def pump(self, upstream: PeerLink) -> bool:
        """The deferred all-gather's pieces that are here now (the workers' next step waits on them layer by layer);
        False once it is complete. MESH or STOP from the coordinator raises Preempted."""
        if self.gathering is not None:
            step, attempt, waiting, take = self.gathering
            self.mesh.collect(P.Kind.GATHER, step, attempt, upstream, waiting, take, block=False)
            if not waiting:
                self.gathering = None
        return self.gathering is not None

    def finish_gather(self, upstream: PeerLink) -> None:
        """Wait for the rest of the all-gather (nothing when it is complete)."""
        if self.gathering is not None:
            step, attempt, waiting, take = self.gathering
            self.mesh.collect(P.Kind.GATHER, step, attempt, upstream, waiting, take)
            self.gathering = None

    def open_gate(self) -> int:
        """A new generation of the workers' weight gate (shared memory: [generation, final up to]) for the step
        about to start while the all-gather still arrives; returns it."""
        self.gate[0] += 1
        self._arrived(None)
        return int(self.gate[0])

    def _stays(self, a: int) -> bool:
        """Is the gather piece starting at `a` the replicated layer's (updated on every host, never sent)?"""
        return self.replicate and self.w[0] <= a < self.w[1]

    def _update_piece(self, a: int, b: int, lr: float, scale: float, wire16: bool = True) -> tuple[float, dict]:
        """Clip + SGD on the piece [a, b); with the float16 wire (and `wire16`: the piece travels) its weights
        become the float16-rounded update's (what the other hosts rebuild). Returns (the update's scale, the arrays
        that carry the piece)."""
        wire16 = wire16 and self.wire16
        prev = self.params[a:b].copy() if wire16 else None
        self.opt.step(self.params, self.red, lr, scale, a, b)
        if wire16:
            return apply_update16(self.params[a:b], prev, self.out16[a:b]), {"update": self.out16[a:b]}
        return 1.0, {"params": self.params[a:b]}
