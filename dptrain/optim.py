"""Momentum SGD over flat arrays, the cosine-with-warmup schedule and global-norm clipping.

All three act on the flat `(P,)` buffers of a ParamStore (or on a `[lo, hi)` slice of them), so the single-process
trainer and the distributed coordinator run literally the same lines. PyTorch's SGD convention:
    d = g + wd * w        (wd only on the ranges that decay)
    v = mu * v + d
    w = w - lr * v
"""
from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to base_lr over warmup_steps
    (step 0 already gets base_lr / warmup_steps, never 0), then a cosine decay to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def sum_of_squares(g: np.ndarray) -> float:
    """Σ g² accumulated in float64 (a float32 dot over 10 M terms loses digits the clip decision can feel)."""
    total = 0.0
    chunk = 1 << 20
    for lo in range(0, g.size, chunk):  # chunks keep the float64 temporary small
        part = g[lo:lo + chunk].astype(np.float64)
        total += float(np.dot(part, part))
    return total


def clip_factor(norm: float, clip_norm: float) -> float:
    """Scale that brings a gradient of L2 norm `norm` down to `clip_norm` (1.0 when clipping is off or not needed)."""
    if clip_norm <= 0 or norm <= clip_norm:
        return 1.0
    return clip_norm / (norm + 1e-6)


class SGD:
    """Momentum SGD with decoupled-from-nothing (PyTorch-style, L2) weight decay over flat buffers.

    `decay_ranges` are [start, stop) ranges of the flat array that take weight decay (see ParamStore.decay_ranges);
    the velocity lives here (or in caller-provided memory, e.g. shared memory) and is checkpointed by the caller.
    """

    def __init__(self, num_params: int, *, momentum: float, weight_decay: float,
                 decay_ranges: list[tuple[int, int]], velocity: np.ndarray | None = None, dtype=np.float32):
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.decay_ranges = decay_ranges
        self.velocity = np.zeros(num_params, dtype) if velocity is None else velocity
        self._scratch = np.empty(num_params, dtype)

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float, scale: float = 1.0,
             lo: int = 0, hi: int | None = None) -> None:
        """One update of params[lo:hi] in place with grads[lo:hi] * scale (scale = clip factor).
        `grads` is modified (it receives the weight-decay term)."""
        hi = params.size if hi is None else hi
        w, g, v, tmp = params[lo:hi], grads[lo:hi], self.velocity[lo:hi], self._scratch[lo:hi]
        if scale != 1.0:
            g *= np.float32(scale) if g.dtype == np.float32 else scale
        if self.weight_decay:
            for a, b in self.decay_ranges:
                a, b = max(a, lo) - lo, min(b, hi) - lo
                if a < b:
                    np.multiply(w[a:b], self.weight_decay, out=tmp[a:b])
                    g[a:b] += tmp[a:b]
        v *= self.momentum
        v += g
        np.multiply(v, lr, out=tmp)
        w -= tmp
