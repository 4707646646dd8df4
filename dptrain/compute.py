"""The work on one shard, the same wherever it runs: the single process, a worker, the evaluation command.

`shard_gradient` is forward + backward of a shard of a global batch: the gradient of the shard's share of the
*global* mean loss (dlogits / global count) lands in the model's gradient views, so summing the shards' gradients
in any process gives the gradient of the global batch. `evaluate_batches` is a forward pass in eval mode (BN running
statistics, no augmentation) over a list of images in fixed-size batches.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .config import DataConfig
from .data.augment import make_batch
from .nn.loss import softmax_cross_entropy


class ShardResult(NamedTuple):
    loss_sum: float  # Σ per-sample loss over the shard
    correct: int  # Σ argmax hits
    timings: dict  # phase -> [wall-clock start (time.time()), seconds] for load, forward, backward


def shard_gradient(model, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, *, epoch: int,
                   global_count: int, data: DataConfig, seed: int, smoothing: float = 0.0, on_ready=None
                   ) -> ShardResult:
    """Forward and backward of images[indices]; the gradient goes into the model's (store's) gradient views
    (`on_ready`: see Model.backward; `smoothing`: train.label_smoothing)."""
    t0 = time.time()
    x = make_batch(images, indices, epoch=epoch, seed=seed, augment=data.augment, max_shift=data.max_shift)
    t1 = time.time()
    logits = model.forward(x, train=True)  # (B, K)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, labels[indices], global_count, smoothing)
    t2 = time.time()
    model.backward(dlogits, on_ready)
    t3 = time.time()
    return ShardResult(loss_sum, correct, {"load": [t0, t1 - t0], "forward": [t1, t2 - t1],
                                           "backward": [t2, t3 - t2]})


def evaluate_batches(model, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int
                     ) -> tuple[float, int, np.ndarray]:
    """(Σ loss, Σ correct, predicted class per image) over images[indices], `batch_size` images at a time."""
    loss_total, correct_total = 0.0, 0
    pred = np.empty(len(indices), np.int64)
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo:lo + batch_size]
        x = make_batch(images, idx, augment=False)  # (B, S, S, 3) float32
        logits = model.forward(x, train=False)  # (B, K)
        loss_sum, _, correct = softmax_cross_entropy(logits, labels[idx])
        loss_total += loss_sum
        correct_total += correct
        pred[lo:lo + len(idx)] = logits.argmax(axis=1)
    return loss_total, correct_total, pred
