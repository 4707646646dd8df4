"""A peer's link to its coordinator: what a worker and a host agent share.

A peer (a worker on one host, an agent for a whole host) holds one DEALER socket to a coordinator's ROUTER:

    HELLO -> WELCOME (or STOP: refused) -> READY -> STEP -> RESULT ... -> STOP
               during a step, with --bn sync: BN_REDUCE -> BN_REDUCED per layer and phase

`PeerLink` owns that socket and everything said on it: sending with the run id, step and rank filled in; receiving
with malformed messages dropped and logged; the handshake; the heartbeat thread (its own socket, so a long step never
delays a beat); the sync-BN wait, which gives way when the coordinator starts a new attempt of the step; RESULT; and
the serve loop. `run_peer` is the error wrapper both processes run under: a one-line reason for an expected failure,
the traceback for a bug, both also sent to the coordinator as ERROR once it has welcomed us.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

import numpy as np
import zmq

from .. import log
from . import protocol as P
from .versions import local_versions

EXIT_COORDINATOR_LOST = 3
IDLE_POLL_S = 0.05  # with an `idle` callback (an agent serving its own workers), poll upstream in slices this long


# what gives up a peer's wait inside a step (a sync-BN sum, weights still arriving): the next step attempt, STOP, or
# a plane formed anew
PREEMPTING = (P.Kind.STEP, P.Kind.STOP, P.Kind.MESH)


class Preempted(Exception):
    """The coordinator sent a STEP or STOP while this peer waited on a sync-BN reduction: handle that message next."""

    def __init__(self, msg: P.Message):
        self.msg = msg


def dealer(ctx: zmq.Context, endpoint: str, identity: str, curve=None, *, max_frame: int) -> zmq.Socket:
    """A connected DEALER that drops unsent messages on close; `curve` makes it a CURVE client (agents). Its
    identity is `identity` plus random bytes: a ROUTER ignores a second connection under a name it knows, so a
    guessable one (a name and a pid, which `ps` shows) could be taken first by someone else's socket. A frame over
    `max_frame` bytes (protocol.max_frame_bytes) drops the connection before it is allocated."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.IDENTITY, f"{identity}-{secrets.token_hex(8)}".encode())
    if curve:
        curve(sock)
    sock.connect(endpoint)
    return sock


class Heartbeat(threading.Thread):
    """Beats on its own DEALER socket; ends the process when the coordinator (or, for a worker, its parent)
    goes silent, so a lost coordinator never leaves peers behind."""

    def __init__(self, ctx, endpoint: str, run_id: str, rank: int, interval_s: float, misses: int, curve=None,
                 watch_parent: bool = True, token: str | None = None):
        super().__init__(daemon=True, name=f"heartbeat-{rank}")
        self.ctx, self.endpoint, self.run_id, self.rank = ctx, endpoint, run_id, rank
        self.token = token  # one host: this socket proves it to the coordinator too (its first beat does)
        self.interval_s, self.misses, self.curve = interval_s, misses, curve
        self.parent = os.getppid() if watch_parent else None

    def run(self) -> None:
        sock = dealer(self.ctx, self.endpoint, f"hb{self.rank}-{os.getpid()}", self.curve,  # HEARTBEATs only
                      max_frame=P.DEFAULT_LIMITS.max_header_bytes)
        last_answer = time.monotonic()
        try:
            beat = P.encode(P.Kind.HEARTBEAT, self.run_id, rank=self.rank,
                            **({"token": self.token} if self.token is not None else {}))
            while True:
                sock.send_multipart(beat, copy=False)
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0:
                    if sock.poll(int(left * 1000) + 1):
                        sock.recv_multipart()
                        last_answer = time.monotonic()
                silent = time.monotonic() - last_answer
                orphaned = self.parent is not None and os.getppid() != self.parent
                if silent > self.interval_s * self.misses or orphaned:
                    why = "parent process exited" if orphaned else f"no answer for {silent:.1f} s"
                    log.get().error(f"coordinator lost ({why}); exiting")
                    os._exit(EXIT_COORDINATOR_LOST)
        finally:
            sock.close(0)


class PeerLink:
    """One peer's connection to its coordinator. `who` prefixes error messages ("rank 3", "host b")."""

    def __init__(self, endpoint: str, run_id: str, rank: int, who: str, curve=None,
                 idle: Callable[[], None] | None = None, max_frame: int | None = None):
        self.endpoint, self.run_id, self.rank, self.who, self.curve = endpoint, run_id, rank, who, curve
        self.idle = idle  # called between upstream polls (an agent answers its workers meanwhile)
        self.ctx = zmq.Context()
        # max_frame: the run's (a worker's launcher knows it); None before the run is known (an agent's link)
        self.sock = dealer(self.ctx, endpoint, f"{who.replace(' ', '')}-{os.getpid()}", curve,
                           max_frame=P.ceiling_frame_bytes() if max_frame is None else max_frame)
        self.log = log.get()
        self.step = self.attempt = 0
        self.welcomed = False
        self.token: str | None = None  # one host: the launcher's token, said in HELLO and by the heartbeat socket
        self.stash: deque[P.Message] = deque()  # read while waiting on something else (mesh.collect): next in line

    # ---- messages ----------------------------------------------------------------------------------------------
    def send(self, kind: P.Kind, arrays: dict | None = None, **fields) -> None:
        self.sock.send_multipart(P.encode(kind, self.run_id, step=self.step, rank=self.rank, arrays=arrays,
                                          **fields), copy=False)

    def recv(self, timeout_s: float | None = None) -> P.Message | None:
        """The next valid message, or None after timeout_s (None: wait for ever); malformed ones are dropped."""
        if self.stash:
            return self.stash.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self.idle is not None:
                self.idle()
                left = IDLE_POLL_S if left is None else min(left, IDLE_POLL_S)
            if not self.sock.poll(None if left is None else int(left * 1000)):
                continue
            msg = self._read()
            if msg is not None:
                return msg

    def watch(self, preempting: tuple[P.Kind, ...] = PREEMPTING) -> None:
        """A message that is already here, if any: one of the `preempting` kinds raises Preempted (the caller's wait
        is given up), anything else waits its turn in the stash."""
        msg = self.poll_once()
        if msg is not None:
            if msg.kind in preempting:
                raise Preempted(msg)
            self.stash.append(msg)

    def poll_once(self) -> P.Message | None:
        """A message that is already here, without waiting (None: none, or it was malformed and dropped)."""
        return self._read() if self.sock.poll(0) else None

    def _read(self) -> P.Message | None:
        """The waiting message, decoded; a malformed one is logged and dropped (None)."""
        frames = self.sock.recv_multipart(copy=False)
        try:
            return P.decode(frames, run=self.run_id)
        except P.ProtocolError as e:
            self.log.warning(f"dropped a malformed message from the coordinator: {e}")
            return None

    def handshake(self, role: str, host: str, slots: int, timeout_s: float, token: str | None = None,
                  join: bool = False) -> P.Message:
        """HELLO (with the launcher's token on one host; `join`: an agent taking the place of a lost host), then the
        WELCOME, which says the rank this peer has from now on; anything else ends the process with one line saying
        why."""
        self.token = token
        self.send(P.Kind.HELLO, role=role, host=host, pid=os.getpid(), slots=slots, **local_versions(),
                  **({"token": token} if token is not None else {}), **({"join": True} if join else {}))
        msg = self.recv(timeout_s)
        if msg is None:
            raise SystemExit(f"{self.who}: no answer from the coordinator at {self.endpoint} within {timeout_s:.0f} s"
                             + (" (is the address reachable from this host, and are the keys right?)"
                                if self.curve else ""))
        if msg.kind is P.Kind.STOP:
            raise SystemExit(f"{self.who}: coordinator refused: {msg.fields['reason']}")
        if msg.kind is not P.Kind.WELCOME:
            raise SystemExit(f"{self.who}: expected WELCOME, got {msg.kind.name}")
        self.welcomed = True
        rank = msg.fields.get("your_rank", self.rank)
        if isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < msg.fields["world_size"]:
            self.rank = rank
        return msg

    def start_heartbeat(self, interval_s: float, misses: int, watch_parent: bool) -> None:
        Heartbeat(self.ctx, self.endpoint, self.run_id, self.rank, interval_s, misses, self.curve,
                  watch_parent, self.token).start()

    def allreduce(self, layer: int, phase: str, local: np.ndarray) -> np.ndarray:
        """`local` summed over every rank of this step attempt, in rank order (a round trip to the coordinator).
        Raises Preempted when the coordinator moves on (a new attempt after a lost rank, or STOP)."""
        self.send(P.Kind.BN_REDUCE, arrays={"moments": np.ascontiguousarray(local, np.float64)}, layer=layer,
                  phase=phase, attempt=self.attempt)
        later = []  # anything else waits its turn (an agent's stash: a SYNC read while it took its all-gather)
        try:
            while True:
                msg = self.recv()
                if msg.kind is P.Kind.BN_REDUCED and msg.step == self.step and msg.fields["layer"] == layer \
                        and msg.fields["phase"] == phase and msg.fields["attempt"] == self.attempt:
                    return np.array(msg.arrays["moments"], np.float64)
                if msg.kind in PREEMPTING:
                    raise Preempted(msg)
                if msg.kind is not P.Kind.BN_REDUCED:
                    later.append(msg)
        finally:
            self.stash.extendleft(reversed(later))

    def send_result(self, phase: str, count: int, loss_sum: float, correct: int, timings: dict | None = None,
                    grad_in: str = "none", grad: np.ndarray | None = None, grad_scale: float = 1.0,
                    bn_moments: np.ndarray | None = None, arrays: dict | None = None, **extra) -> None:
        arrays = dict(arrays or {})
        if grad is not None:
            arrays["grad"] = grad
        if bn_moments is not None:
            arrays["bn_moments"] = bn_moments
        self.send(P.Kind.RESULT, arrays=arrays, phase=phase, attempt=self.attempt, count=int(count),
                  loss_sum=float(loss_sum), correct=int(correct), grad_in=grad_in, grad_scale=float(grad_scale),
                  timings=timings or {}, sent_at=time.time(), **extra)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def serve(self, run_step: Callable[[P.Message], None],
              handlers: dict[P.Kind, Callable[[P.Message], None]] | None = None) -> int:
        """Run every STEP (and every message of a kind in `handlers`) until STOP. A STEP or STOP that preempted a
        sync-BN wait is handled next."""
        pending = None
        while True:
            msg, pending = (pending, None) if pending else (self.recv(), None)
            if msg.kind is P.Kind.STOP:
                self.log.info(f"{self.who}: stopping: {msg.fields['reason']}")
                return 0
            if handlers and msg.kind in handlers:
                self.step, self.attempt = msg.step, msg.fields["attempt"]
                try:
                    handlers[msg.kind](msg)
                except Preempted as p:
                    pending = p.msg
                continue
            if msg.kind is not P.Kind.STEP:
                continue
            self.step, self.attempt = msg.step, msg.fields["attempt"]
            try:
                run_step(msg)
            except Preempted as p:
                pending = p.msg

    def report_error(self, message: str, tb: str) -> None:
        """ERROR to the coordinator (only once it knows us: before WELCOME it would be dropped as unknown)."""
        if not self.welcomed:
            return
        try:
            self.send(P.Kind.ERROR, message=message, traceback=tb)
            time.sleep(0.2)  # let it leave: the socket closes with LINGER 0
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.sock.close(0)


def leave(rc: int) -> None:
    """End a peer process now, once it has released what it owns: the interpreter's teardown would terminate ZeroMQ
    contexts whose heartbeat thread (a daemon, frozen at exit) still holds a socket, and zmq_ctx_term waits for it
    for ever (seen, rarely, as an agent that logged "stopping" and never exited)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run_peer(link: PeerLink, body: Callable[[], int], stop_exc: tuple[type[BaseException], ...] = ()) -> int:
    """Run a peer's `body` (handshake + serve) with the one error policy both peers follow: an expected failure
    (SystemExit with a reason) is one line, a bug is a traceback; either is reported to the coordinator as ERROR.
    `stop_exc`: exceptions that mean "asked to stop" (an agent's SIGTERM), exit 0."""
    lg = log.get()
    try:
        return body()
    except SystemExit as e:
        lg.error(str(e))
        link.report_error(str(e), "")
        return 1
    except stop_exc as e:
        lg.warning(f"{link.who}: stopping on {e}")
        return 0
    except Exception:
        tb = traceback.format_exc()
        lg.error(f"{link.who}: failed:\n{tb}")
        link.report_error(f"{link.who}: {tb.strip().splitlines()[-1]}", tb)
        return 1
