"""The executor contract (what the Trainer asks of whoever computes the gradients) and the single-process executor.

`dptrain train` plugs `LocalExecutor` into the Trainer (train.py); `--replay-workers` replay.py's, `--batch-invariant`
invariant.py's, `dptrain launch` distributed/executor.py's. They share the exceptions below with the Trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .compute import evaluate_batches, shard_gradient
from .config import Config
from .data.dataset import Dataset
from .nn.params import ParamStore
from .nn.threads import match_blas_threads
from .optim import SGD, clipped_step


@dataclass
class StepResult:
    count: int  # samples in the global batch
    loss_sum: float  # Σ per-sample loss
    correct: int  # Σ argmax hits
    bn_moments: np.ndarray  # float64, Σ over the batch of every BN layer's [count, Σx, Σx²]
    grad_norm: float  # global L2 norm of the gradient before clipping
    slowest: str = ""  # who the step waited on last (distributed runs)
    ranks: list[int] | None = None  # one host: the worker ranks that computed it, when not all of them (a loss)
    cipher_cpu_s: float | None = None  # mesh, AES-GCM: the hosts' CPU-seconds sealing + opening so far, summed


class StepInterrupted(Exception):
    """An executor gave up the running step after `request_stop`; nothing of the step was applied."""


class ExecutorFailure(RuntimeError):
    """An executor cannot compute steps any more (a worker lost under `abort`). The Trainer saves `last` (the
    failed step changed nothing) and re-raises."""


class Executor(Protocol):
    """What the Trainer asks of whoever computes the gradients. An executor with a true `averages` attribute keeps
    train.ema's average itself, from the weights it writes (the workers, in shared memory): the Trainer then does
    not update it."""

    def train_step(self, indices: np.ndarray, epoch: int, step: int, lr: float) -> StepResult:
        """One optimizer step on the mean loss over images[indices]: gradient, global-norm clip at
        train.clip_norm, SGD at lr. Either all of it happens or none (StepInterrupted, ExecutorFailure)."""

    def evaluate(self, indices: np.ndarray, weights_replaced: bool = False) -> tuple[float, int]:
        """(Σ loss, Σ correct) over images[indices] in eval mode, with the store's weights. `weights_replaced`: the
        caller put other weights in the store since the last step (an executor that ships weights must resend)."""

    def request_stop(self, grace_s: float) -> None:
        """A stop was asked for (Ctrl-C, SIGTERM): let the running step take at most grace_s more."""

    def settle(self) -> int:
        """Bring the store and the optimizer up to the last step train_step returned, before a checkpoint. Returns
        how many of the latest steps it could not bring in (0; under `abort`, the steps since a mesh's last sync
        when a host was lost before answering): the checkpoint then says so by its step."""

    def summary(self) -> dict:
        """Extra fields for summary.json."""

    def meanwhile(self, work):
        """work() (slow I/O: a checkpoint on a slow disk) while the executor keeps its peers alive; its result, or
        its exception. Optional: without it the Trainer calls work() itself."""

    def close(self) -> None:
        """Release what the executor holds (called once, after the last step)."""


class LocalExecutor:
    """Computes a whole global batch in this process."""

    def __init__(self, cfg: Config, model, dataset: Dataset, store: ParamStore, opt: SGD):
        self.cfg, self.model, self.ds, self.store, self.opt = cfg, model, dataset, store, opt
        # this process computes everything: its non-GEMM kernels use the BLAS threads too
        match_blas_threads(cfg.train.short_blas_spin)

    def train_step(self, indices: np.ndarray, epoch: int, step: int, lr: float) -> StepResult:
        r = shard_gradient(self.model, self.ds.images, self.ds.labels, indices, epoch=epoch,
                           global_count=len(indices), data=self.cfg.data, seed=self.cfg.train.seed,
                           smoothing=self.cfg.train.label_smoothing)
        norm = clipped_step(self.opt, self.store.params, self.store.grads, lr, self.cfg.train.clip_norm, step)
        return StepResult(len(indices), r.loss_sum, r.correct, self.model.bn_moments(), norm)

    def evaluate(self, indices: np.ndarray, weights_replaced: bool = False) -> tuple[float, int]:
        batch = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        loss_sum, correct, _ = evaluate_batches(self.model, self.ds.images, self.ds.labels, indices, batch)
        return loss_sum, correct

    def request_stop(self, grace_s: float) -> None:
        pass  # the step runs in this thread: it finishes first

    def settle(self) -> int:
        return 0  # every step is whole when train_step returns

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass
