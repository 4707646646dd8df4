"""Softmax cross-entropy fused with its gradient, from logits, stable through log-sum-exp.

`denom` is the GLOBAL batch size: each of N workers computes dlogits for its shard with the same denom, so the sum of
the workers' gradients is the gradient of the mean loss over the global batch.
"""
from __future__ import annotations

import numpy as np


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, denom: float | None = None,
                          smoothing: float = 0.0) -> tuple[float, np.ndarray, int]:
    """logits: (N, K), labels: (N,) ints in [0, K) -> (loss_sum, dlogits (N, K), correct).

    loss_sum: sum over the N samples of the cross-entropy against the target q = (1 - s) onehot + s / K (label
    smoothing s; s = 0: -log softmax(logits)[label]) (a Python float);
    dlogits = (softmax - q) / denom (denom defaults to N); correct: number of argmax hits.
    """
    N = logits.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(N)
    z = logits - logits.max(axis=1, keepdims=True)  # (N, K), max entry 0 so exp cannot overflow
    ez = np.exp(z)
    sum_ez = ez.sum(axis=1, keepdims=True)  # (N, 1)
    logp_label = z[rows, labels] - np.log(sum_ez[:, 0])  # (N,)
    loss_sum = float(-logp_label.astype(np.float64).sum())
    dlogits = ez / sum_ez  # softmax (N, K)
    if smoothing:  # -Σ_k q_k log p_k = (1 - s) (-log p_label) + s * mean_k(-log p_k)
        K = logits.shape[1]
        mean_logp = z.astype(np.float64).mean(axis=1) - np.log(sum_ez[:, 0].astype(np.float64))  # (N,)
        loss_sum = (1.0 - smoothing) * loss_sum - smoothing * float(mean_logp.sum())
        dlogits -= dlogits.dtype.type(smoothing / K)
    dlogits[rows, labels] -= dlogits.dtype.type(1.0 - smoothing)
    dlogits *= dlogits.dtype.type(1.0 / (N if denom is None else denom))
    correct = int((logits.argmax(axis=1) == labels).sum())
    return loss_sum, dlogits, correct
