"""A worker process: stateless, computes the gradient of the shards its coordinator sends.

    dptrain worker --connect tcp://127.0.0.1:PORT --rank R --run RUN_ID   (started by `launch` or an agent)

Life: HELLO -> WELCOME (config, shared-memory names) -> build the model on the shared weights -> READY -> STEP ...
-> STOP. The link (peer.py) beats every `heartbeat_interval_s` on its own socket; when the coordinator has not
answered for `heartbeat_misses` intervals, or the process that started this one is gone, the worker exits on its own
(exit code 3): a lost coordinator never leaves workers behind. Workers only ever talk to a coordinator on their own
host (launch's, or their agent's), so their link has no CURVE.

On one host the weights, BN buffers and this rank's gradient slot are shared-memory arrays: backward writes the
gradient straight into the slot the coordinator sums, and the coordinator's SGD writes the weights this worker reads.
With transport "socket" the weights arrive as frames of STEP and the gradient leaves as a frame of RESULT.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket as pysocket
import sys
import threading
import time

import numpy as np

from .. import config as config_mod, log
from ..compute import evaluate_batches, shard_gradient
from ..data.shm import SharedArray
from ..ema import blend
from ..nn.layers import ResidualBlock, Sequential, walk
from ..nn.model import build_model
from ..nn.params import Param, ParamStore
from ..nn.threads import match_blas_threads
from ..optim import chunk_squares, sgd_for
from . import invariant, protocol as P, timeslice
from .localsum import LocalSum
from .peer import PeerLink, leave, run_peer
from .reduce import Factors, reduce_range
from .wire import grad_frame, receive_weights


class Worker:
    def __init__(self, endpoint: str, rank: int, run_id: str, token: str, max_frame: int):
        self.rank, self.token = rank, token
        self.host = pysocket.gethostname()
        self.link = PeerLink(endpoint, run_id, rank, f"rank {rank}", max_frame=max_frame)
        self.log = log.get()
        self.segments: list[SharedArray] = []
        self.bn_calls = 0

    def start(self, timeout_s: float = 60.0) -> None:
        msg = self.link.handshake("worker", self.host, 1, timeout_s, self.token)
        f = msg.fields
        self.cfg = config_mod.from_dict(f["config"])
        d = self.cfg.dist
        self.link.start_heartbeat(d.heartbeat_interval_s, d.heartbeat_misses, watch_parent=True)
        self.labels = np.array(msg.arrays["labels"], dtype=np.int64)
        shm = f["shm"]
        self.images = self._attach(shm["images"], readonly=True).array
        self.store = ParamStore(np.float32)
        self.model = build_model(self.cfg.model, int(f["num_classes"]), self.cfg.data.image_size, self.store,
                                 rng=np.random.default_rng(0))
        match_blas_threads(self.cfg.train.short_blas_spin)  # BLAS got cores // N threads; other kernels follow
        self.shm_weights = "params" in shm
        self.buckets = bool(f.get("buckets"))  # under a mesh agent: say when each part of the gradient is final
        # dist.factored: the hidden Linear leaves its (x, dy) in the host's factor arrays (slots, batch cap, K | F);
        # factor_slots (w0, K, F, x, dy) is also what a one-host REDUCE computes that layer's dW from
        self.factor_layer = self.factor_slots = None
        if f.get("factored"):
            self.factor_layer = self.model.factor_layer()
            self.factor_layer.factored = True
            fx, fdy = (self._attach(f["factored"][k]).array for k in ("x", "dy"))
            self.factor_slots = (self.factor_layer.w.offset, *self.factor_layer.w.shape, fx, fdy)
        self.slot = -1  # which half of a double weight buffer the model reads (-1: a single buffer)
        if self.shm_weights:
            params = self._attach(shm["params"], readonly="velocity" not in shm).array
            buffers = self._attach(shm["buffers"], readonly=True).array
            self.grad_slots = self._attach(shm["grads"]).array  # (N, P): this rank writes its row, reduces a slice
            if "velocity" in shm:  # dist.update = "workers": (2, P) weights and velocity, the reduced gradient
                self.params2, self.velocity2 = params, self._attach(shm["velocity"]).array
                self.gsum = self._attach(shm["gsum"]).array
                self.avg2 = self._attach(shm["ema"]).array if "ema" in shm else None  # train.ema_epochs' average
                self.opt = sgd_for(self.store, self.cfg.train, velocity=self.velocity2[0])
                self.slot, params = 0, params[0]
            grad_row = self.grad_slots[self.rank]
            if invariant.enabled(self.cfg):  # int64 slots: the blocks' exact sum; the model's own row is private
                grad_row = np.zeros(self.store.num_params, np.float32)
            self.store.rebind(params, grad_row, buffers, copy=False)
        # dist.gather_overlap: the agent's gate, int64 [generation, its weights final up to this offset]; a STEP
        # with "gate" starts while the last all-gather still arrives, and each layer waits for its own weights
        self.gate = self._attach(shm["gate"], readonly=True).array if "gate" in shm else None
        self.gate_gen, self.gate_ready = None, 0
        if self.gate is not None:
            gate_layers(self.model, self._wait_weights)
        self.blocks = None
        if invariant.enabled(self.cfg):  # one BLAS thread; the worker's threads compute blocks concurrently
            self.blocks = invariant.worker_runner(self.cfg, int(f["num_classes"]), self.store.num_params)
        self.local_sum, self.round_ranks = None, None
        if self.cfg.dist.bn == "sync":
            self.model.set_bn_allreduce(self._allreduce)
            if "bnsum" in shm:  # one host: the sums among the workers in shared memory (localsum.py)
                self.local_sum = LocalSum(self._attach(shm["bnsum"]).array, self._attach(shm["bnseen"]).array,
                                          self.rank, self.link)
        self.link.send(P.Kind.READY)
        self.log.info(f"ready: pid {os.getpid()} on {self.host}, {self.store.num_params} params, "
                      f"{'shared-memory' if self.shm_weights else 'socket'} weights")

    def _attach(self, spec: dict, readonly: bool = False) -> SharedArray:
        seg = SharedArray.attach(spec, writable=not readonly)
        self.segments.append(seg)
        return seg

    def _allreduce(self, local: np.ndarray) -> np.ndarray:
        """The model's SyncBatchNorm hook. Every rank makes the same calls in the same order each step: one per BN
        layer in forward (moments), then one per layer in backward (sums); a call's position within its phase tags
        the reduction, so the same call of every rank meets the others at the coordinator."""
        n_bn = len(self.model.bn_layers)
        call, self.bn_calls = self.bn_calls, self.bn_calls + 1
        if self.local_sum is not None and self.round_ranks and self.local_sum.fits(local):
            return self.local_sum.allreduce(call, np.asarray(local, np.float64).ravel(), self.round_ranks)
        layer, phase = (call, "fwd") if call < n_bn else (call - n_bn, "bwd")
        return self.link.allreduce(layer, phase, local)

    def serve(self) -> int:
        return self.link.serve(self.run_step, {P.Kind.REDUCE: self.reduce_slice, P.Kind.UPDATE: self.update_slice})

    def reduce_slice(self, msg: P.Message) -> None:
        """gsum[lo:hi] = Σ of the listed ranks' slots over [lo, hi), in their order (elementwise: the same bits as
        one process summing everything), and the slice's block sums of squares for the global norm."""
        f = msg.fields
        lo, hi = f["lo"], f["hi"]
        if self.blocks is not None:  # int64 slots: an exact sum, rounded to float32 once
            invariant.decode_grads(self.gsum, [self.grad_slots[r] for r in f["ranks"]], lo, hi)
        else:
            # dist.factored: the hidden Linear's dW rows of this slice from every rank's factors
            factors = Factors.of_slots(self.factor_slots, f["ranks"], f["counts"]) if "counts" in f else None
            reduce_range(self.gsum, [self.grad_slots[r] for r in f["ranks"]], lo, hi, factors=factors)
        self.link.send(P.Kind.REDUCED, arrays={"squares": chunk_squares(self.gsum[lo:hi])}, attempt=f["attempt"])

    def update_slice(self, msg: P.Message) -> None:
        """Clip + SGD on [lo, hi) from weights/velocity buffer `src` into the other, and with "ema_rate" the weight
        average's slice blended from its `src` half into the other: the `src` halves are left as they were, so a
        step that fails half-way is redone from them."""
        f = msg.fields
        src, dst = f["src"], 1 - f["src"]
        self.opt.step(self.params2[src], self.gsum, f["lr"], f["scale"], f["lo"], f["hi"],
                      params_out=self.params2[dst], velocity_in=self.velocity2[src],
                      velocity_out=self.velocity2[dst])
        if "ema_rate" in f:
            blend(self.avg2[src], self.params2[dst], f["ema_rate"], self.avg2[dst], f["lo"], f["hi"])
        self.link.send(P.Kind.UPDATED, attempt=f["attempt"])

    def _wait_weights(self, need: int) -> None:
        """Before a layer's forward: wait until the agent's all-gather has made the weights below `need` final
        (nothing to wait for without a gate this step). A STEP or STOP meanwhile (the agent gave this step up: a
        host was lost) preempts it, as a sync-BN wait is."""
        if self.gate_gen is None or need <= self.gate_ready:
            return
        t0 = time.time()
        self.gate_wait_from = self.gate_wait_from or t0
        while not (self.gate[0] == self.gate_gen and self.gate[1] >= need):
            self.link.watch()
            time.sleep(GATE_POLL_S)
        self.gate_ready = int(self.gate[1])
        self.gate_wait_s += time.time() - t0

    def run_step(self, msg: P.Message) -> None:
        t_recv = time.time()
        self.bn_calls = 0
        f = msg.fields
        self.gate_gen, self.gate_ready, self.gate_wait_s, self.gate_wait_from = f.get("gate"), 0, 0.0, 0.0
        self.round_ranks = f.get("ranks")  # the round's ranks (one host): whose rows a shared-memory BN sum waits for
        if not self.shm_weights:
            self._take_weights(msg)
        elif f["weights_slot"] != self.slot and f["weights_slot"] >= 0:
            self.slot = f["weights_slot"]
            self.store.rebind(self.params2[self.slot], self.store.grads, self.store.buffers, copy=False)
        idx = np.asarray(msg.arrays["indices"], dtype=np.int64)
        if f["phase"] == "eval":
            loss_sum, correct, _ = evaluate_batches(self.model, self.images, self.labels, idx, f["eval_batch"])
            self.link.send_result("eval", len(idx), loss_sum, correct)
            return
        on_ready = None
        if self.buckets:
            def on_ready(offset: int) -> None:
                if self.factor_layer is not None and offset == self.factor_layer.w.offset:  # that Linear is done
                    self._leave_factors()
                self.link.send(P.Kind.BUCKET, attempt=self.link.attempt, ready_from=offset)
        if self.blocks is not None:
            self._run_blocks(idx, f, t_recv)
            return
        r = shard_gradient(self.model, self.images, self.labels, idx, epoch=f["epoch"],
                           global_count=f["global_count"], data=self.cfg.data, seed=self.cfg.train.seed,
                           smoothing=self.cfg.train.label_smoothing, on_ready=on_ready)
        if self.factor_layer is not None and not self.buckets:  # one host: where the reducers read them
            self._leave_factors()
        timings = {"wait": [t_recv, r.timings["load"][0] - t_recv], **r.timings}
        if self.gate_gen is not None:  # of forward, the time its layers waited for the last all-gather (from the first)
            timings["weights_wait"] = [self.gate_wait_from or t_recv, self.gate_wait_s]
        if self.shm_weights:
            self.link.send_result("train", len(idx), r.loss_sum, r.correct, timings, grad_in="shm",
                                  bn_moments=self.model.bn_moments())
        else:
            grad, scale = grad_frame(self.store.grads, self.cfg.dist.wire_dtype)
            self.link.send_result("train", len(idx), r.loss_sum, r.correct, timings, grad_in="frame", grad=grad,
                                  grad_scale=scale, bn_moments=self.model.bn_moments())

    def _leave_factors(self) -> None:
        """This rank's inputs and output gradients of the factored Linear into its rows of the host's factor arrays."""
        x, dy = self.factor_layer.factors
        _, _, _, fx, fdy = self.factor_slots
        fx[self.rank, :len(x)], fdy[self.rank, :len(dy)] = x, dy

    def _run_blocks(self, idx: np.ndarray, f: dict, t_recv: float) -> None:
        """--batch-invariant: the shard block by block, the exact int64 gradient into this rank's slot (or a frame)."""
        acc = self.grad_slots[self.rank] if self.shm_weights else self.blocks.acc
        r = self.blocks.run(self.store.params, self.store.buffers, self.images, self.labels, idx,
                            epoch=f["epoch"], global_count=f["global_count"], acc=acc,
                            allreduce=self._allreduce if self.cfg.dist.bn == "sync" else None)
        timings = {"wait": [t_recv, r.timings["load"][0] - t_recv], **r.timings}
        self.link.send_result("train", len(idx), r.loss_sum, r.correct, timings,
                              grad_in="shm" if self.shm_weights else "frame",
                              **({} if self.shm_weights else {"grad": acc}), bn_moments=r.moments)

    def _take_weights(self, msg: P.Message) -> None:
        """Socket transport: a full copy is used in place (a read-only view over the frame); an update (float16
        wire) is applied to a private copy."""
        if "params" in msg.arrays:
            self.store.rebind(msg.arrays["params"], self.store.grads, msg.arrays["buffers"], copy=False)
        elif "update" in msg.arrays:
            if not self.store.params.flags.writeable:  # still a view over the last full copy's frame
                self.store.rebind(self.store.params.copy(), self.store.grads, self.store.buffers.copy(), copy=False)
            receive_weights(self.store.params, self.store.buffers, msg.arrays, msg.fields)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.link.close()


GATE_POLL_S = 0.0005  # a worker waiting for its agent's all-gather looks this often (no core kept spinning)


def gate_layers(model, wait) -> None:
    """Every layer of `model` but the containers (whose children are gated themselves) calls wait(end) before its
    forward when it or a layer it holds owns weights, `end` = one past the last of them in the flat buffer
    (dist.gather_overlap). BNPoolReLU reads its BatchNorm's: a child."""
    for layer in walk(model.net):
        if isinstance(layer, (Sequential, ResidualBlock)):
            continue
        ends = [p.offset + p.size for m in walk(layer) for p in vars(m).values() if isinstance(p, Param)]
        if ends:
            layer.forward = _gated(layer.forward, max(ends), wait)


def _gated(forward, need: int, wait):
    def gated(x, train):
        wait(need)
        return forward(x, train)
    return gated


WORKER_STOP_GRACE_S = 30.0  # after a first SIGTERM/SIGINT, the longest a worker waits for its parent's word


def defer_stop_signals(grace_s: float = WORKER_STOP_GRACE_S) -> None:
    """A scheduler that stops a job signals every process of it at once (Slurm's requeue, scancel and time limit),
    this worker too. While the process that started it (an agent or the launcher) lives, that one decides when the
    worker stops (STOP after the step and the checkpoint, or its own exit, which the heartbeat notices): the first
    SIGTERM/SIGINT only starts a countdown. A second one, the countdown's end, or a signal once the parent is gone
    end the worker as the signal always did."""
    parent = os.getppid()
    armed = []

    def handler(signum, frame):
        if armed or os.getppid() != parent:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        armed.append(signum)
        log.get().warning(f"signal {signum}: the process that started this worker decides when it stops (at most "
                          f"{grace_s:.0f} s; again to stop at once)")
        timer = threading.Timer(grace_s, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def run_worker(endpoint: str, rank: int, run_id: str) -> int:
    sliced = timeslice.apply_from_env()  # before the first thread: every thread of this worker inherits it
    log.setup(f"rank{rank}")
    defer_stop_signals()
    if sliced:
        log.get().info(sliced)
    # the coordinator sends SIGUSR1 to a rank it declares stuck: every thread's stack goes to this rank's log first
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    # the launcher's proof that we are its worker and the run's frame limit (stdin: not on the command line)
    token, _, max_frame = sys.stdin.readline().strip().partition(" ")
    w = Worker(endpoint, rank, run_id, token, int(max_frame) if max_frame.isdigit() else 0)
    rc = 1
    try:
        rc = run_peer(w.link, lambda: (w.start(), w.serve())[1])
    finally:
        w.close()
        leave(rc)
