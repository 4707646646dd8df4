"""A worker process: stateless, computes gradient sums for the shards the coordinator sends.

    dptrain worker --connect tcp://127.0.0.1:PORT --rank R --run RUN_ID   (started by `launch` or an agent)

Life: HELLO -> WELCOME (config, shared-memory names) -> build the model on the shared weights -> READY -> STEP ...
-> STOP. A heartbeat thread with its own socket beats every `heartbeat_interval_s`; when the coordinator has not
answered for `heartbeat_misses` intervals, or the process that started this one is gone, the worker exits on its
own (exit code 3): a lost coordinator never leaves workers behind.

On one host the weights, BN buffers and this rank's gradient slot are shared-memory arrays: backward writes the
gradient straight into the slot the coordinator sums, and the coordinator's SGD writes the weights this worker reads.
With transport "socket" the weights arrive as frames of STEP and the gradient leaves as a frame of RESULT.
"""
from __future__ import annotations

import os
import socket as pysocket
import threading
import time
import traceback

import numpy as np
import zmq

from .. import config as config_mod
from .. import log
from ..data.augment import make_batch
from ..data.shm import SharedArray
from ..nn.loss import softmax_cross_entropy
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import match_blas_threads
from . import protocol as P
from .versions import local_versions
from .wire import grad_frame, receive_weights

EXIT_COORDINATOR_LOST = 3


class Preempted(Exception):
    """The coordinator started a new attempt of the step while this one waited on a sync-BN reduction."""

    def __init__(self, msg: P.Message):
        self.msg = msg


def serve_steps(recv, run_step, lg, who: str) -> int:
    """The peer loop (workers and agents): run every STEP; a STEP or STOP that preempts a waiting sync-BN
    reduction is handled next; STOP ends it."""
    pending = None
    while True:
        msg, pending = (pending, None) if pending else (recv(), None)
        if msg is None:
            continue
        if msg.kind is P.Kind.STOP:
            lg.info(f"{who}stopping: {msg.fields['reason']}")
            return 0
        if msg.kind is not P.Kind.STEP:
            continue
        try:
            run_step(msg)
        except Preempted as p:
            pending = p.msg


def dealer(ctx: zmq.Context, endpoint: str, identity: str, curve=None) -> zmq.Socket:
    """A connected DEALER that drops unsent messages on close; `curve` makes it a CURVE client (agents only)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    if curve:
        curve(sock)
    sock.connect(endpoint)
    return sock


class Heartbeat(threading.Thread):
    """Beats on its own DEALER socket; kills the process when the coordinator (or the parent) goes silent."""

    def __init__(self, ctx, endpoint: str, run_id: str, rank: int, interval_s: float, misses: int, curve=None,
                 watch_parent: bool = True):
        super().__init__(daemon=True, name=f"heartbeat-{rank}")
        self.ctx, self.endpoint, self.run_id, self.rank = ctx, endpoint, run_id, rank
        self.interval_s, self.misses, self.curve = interval_s, misses, curve
        self.parent = os.getppid() if watch_parent else None
        self.stopped = threading.Event()

    def run(self) -> None:
        sock = dealer(self.ctx, self.endpoint, f"hb{self.rank}-{os.getpid()}", self.curve)
        last_answer = time.monotonic()
        try:
            while not self.stopped.is_set():
                sock.send_multipart(P.encode(P.Kind.HEARTBEAT, self.run_id, rank=self.rank), copy=False)
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0 and not self.stopped.is_set():
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


class Worker:
    def __init__(self, endpoint: str, rank: int, run_id: str, host: str | None = None):
        # Workers only ever talk to a coordinator on their own host (launch's, or their agent's): no CURVE.
        self.endpoint, self.rank, self.run_id = endpoint, rank, run_id
        self.host = host or pysocket.gethostname()
        self.ctx = zmq.Context()
        self.sock = dealer(self.ctx, endpoint, f"w{rank}-{os.getpid()}")
        self.log = log.get()
        self.segments: list[SharedArray] = []
        self.bn_calls = 0
        self.step = self.attempt = -1

    # ---- messaging ---------------------------------------------------------------------------------------------
    def send(self, kind, arrays=None, **fields) -> None:
        self.sock.send_multipart(P.encode(kind, self.run_id, step=self.step, rank=self.rank, arrays=arrays, **fields),
                                 copy=False)

    def recv(self, timeout_s: float | None = None) -> P.Message | None:
        """Next valid message, or None on timeout; malformed ones are logged and dropped."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.sock.poll(None if left is None else int(left * 1000)):
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                return P.decode(frames, run=self.run_id)
            except P.ProtocolError as e:
                self.log.warning(f"dropped a malformed message: {e}")

    # ---- set-up ------------------------------------------------------------------------------------------------
    def handshake(self, timeout_s: float = 60.0) -> None:
        self.send(P.Kind.HELLO, role="worker", host=self.host, pid=os.getpid(), **local_versions())
        msg = self.recv(timeout_s)
        if msg is None:
            raise SystemExit(f"rank {self.rank}: no WELCOME from {self.endpoint} within {timeout_s:.0f} s")
        if msg.kind is P.Kind.STOP:
            raise SystemExit(f"rank {self.rank}: coordinator refused: {msg.fields['reason']}")
        if msg.kind is not P.Kind.WELCOME:
            raise SystemExit(f"rank {self.rank}: expected WELCOME, got {msg.kind.name}")
        f = msg.fields
        self.cfg = config_mod.from_dict(f["config"])
        d = self.cfg.dist
        Heartbeat(self.ctx, self.endpoint, self.run_id, self.rank, d.heartbeat_interval_s, d.heartbeat_misses).start()
        self.labels = np.array(msg.arrays["labels"], dtype=np.int64)
        shm = f["shm"]
        images = self._attach(shm["images"], readonly=True)
        self.images = images.array
        self.store = ParamStore(np.float32)
        self.model = build_model(self.cfg.model, int(f["num_classes"]), self.cfg.data.image_size, self.store,
                                 rng=np.random.default_rng(0))
        match_blas_threads()  # launch gave this worker cores // N BLAS threads; the other kernels follow suit
        self.shm_weights = "params" in shm
        if self.shm_weights:
            params = self._attach(shm["params"], readonly=True).array
            buffers = self._attach(shm["buffers"], readonly=True).array
            grads = self._attach(shm["grads"]).array[self.rank]
            self.store.rebind(params, grads, buffers, copy=False)
        if self.cfg.dist.bn == "sync":
            self.model.set_bn_allreduce(self._allreduce)
        self.weights_version = -1
        self.send(P.Kind.READY)
        self.log.info(f"ready: pid {os.getpid()} on {self.host}, {self.store.num_params} params, "
                      f"{'shared-memory' if self.shm_weights else 'socket'} weights")

    def _attach(self, spec: dict, readonly: bool = False) -> SharedArray:
        seg = SharedArray.attach(spec, writable=not readonly)
        self.segments.append(seg)
        return seg

    # ---- sync BatchNorm ------------------------------------------------------------------------------------------
    def _allreduce(self, local: np.ndarray) -> np.ndarray:
        """Sum `local` over every rank of this step attempt (one round trip through the coordinator)."""
        layer, self.bn_calls = self.bn_calls, self.bn_calls + 1
        self.send(P.Kind.BN_REDUCE, arrays={"moments": np.ascontiguousarray(local, np.float64)}, layer=layer,
                  phase="x", attempt=self.attempt)
        while True:
            msg = self.recv()
            if msg.kind is P.Kind.BN_REDUCED and msg.fields["layer"] == layer and msg.step == self.step \
                    and msg.fields.get("attempt") == self.attempt:
                return np.array(msg.arrays["moments"], dtype=np.float64)
            if msg.kind in (P.Kind.STEP, P.Kind.STOP):
                raise Preempted(msg)

    # ---- the loop --------------------------------------------------------------------------------------------------
    def serve(self) -> int:
        return serve_steps(self.recv, self.run_step, self.log, "")

    def run_step(self, msg: P.Message) -> None:
        t_recv = time.time()
        self.step, self.attempt, self.bn_calls = msg.step, msg.fields.get("attempt", 0), 0
        flags = msg.fields["flags"]
        if not self.shm_weights and "params" in msg.arrays:
            # Socket transport: the weights frame is the weights (read-only, zero-copy view over the message).
            self.store.rebind(msg.arrays["params"], self.store.grads, msg.arrays["buffers"], copy=False)
        elif not self.shm_weights and "dparams" in msg.arrays:  # float16 wire: the update to apply
            if not self.store.params.flags.writeable:  # still a view over the last full copy's frame
                self.store.rebind(self.store.params.copy(), self.store.grads, self.store.buffers.copy(), copy=False)
            receive_weights(self.store.params, self.store.buffers, msg.arrays, msg.fields)
        idx = np.asarray(msg.arrays["indices"], dtype=np.int64)
        if flags.get("phase") == "eval":
            loss_sum, correct = self._evaluate(idx, int(flags.get("batch") or 64))
            self.send(P.Kind.RESULT, count=len(idx), loss_sum=loss_sum, correct=correct, grad_slot=-2,
                      timings={}, attempt=self.attempt, phase="eval")
            return
        t0 = time.time()
        x = make_batch(self.images, idx, epoch=msg.fields["epoch"], seed=self.cfg.train.seed,
                       augment=self.cfg.data.augment, max_shift=self.cfg.data.max_shift)
        t1 = time.time()
        logits = self.model.forward(x, train=True)
        loss_sum, dlogits, correct = softmax_cross_entropy(logits, self.labels[idx], int(flags["global_count"]))
        t2 = time.time()
        self.model.backward(dlogits)
        t3 = time.time()
        arrays, grad_scale = {"bn_moments": self.model.bn_moments()}, 1.0
        if not self.shm_weights:
            arrays["grad"], grad_scale = grad_frame(self.store.grads, self.cfg.dist.wire_dtype)
        timings = {"wait": [t_recv, t0 - t_recv], "load": [t0, t1 - t0], "forward": [t1, t2 - t1],
                   "backward": [t2, t3 - t2]}
        self.send(P.Kind.RESULT, arrays=arrays, count=len(idx), loss_sum=float(loss_sum), correct=int(correct),
                  grad_slot=self.rank if self.shm_weights else -1, grad_scale=grad_scale, timings=timings,
                  attempt=self.attempt,
                  phase="train", sent_at=time.time())

    def _evaluate(self, idx: np.ndarray, batch: int) -> tuple[float, int]:
        from ..train import evaluate_local
        return evaluate_local(self.model, self.images, self.labels, idx, batch)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
            if seg.owner:
                seg.unlink()
        self.sock.close(0)


def run_worker(endpoint: str, rank: int, run_id: str) -> int:
    log.setup(f"rank{rank}")
    w = Worker(endpoint, rank, run_id)
    try:
        w.handshake()
        return w.serve()
    except SystemExit as e:
        log.get().error(str(e))
        return 1
    except Exception:
        tb = traceback.format_exc()
        log.get().error(f"failed:\n{tb}")
        try:
            w.send(P.Kind.ERROR, message=tb.strip().splitlines()[-1], traceback=tb)
        except Exception:
            pass
        return 1
    finally:
        w.close()
