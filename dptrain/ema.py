"""An exponential moving average of the weights (Polyak averaging, "model EMA"), the model that is evaluated.

    avg = avg + (1 - d) * (w - avg)      after every optimizer step, d = 1 - 1 / (train.ema_epochs * steps_per_epoch)

The horizon is given in epochs, so a default does not depend on the dataset's size or the batch. The average is
taken by the Trainer from the weights each step leaves (whoever applied it: this process, the workers in shared
memory, the coordinator), in fixed CHUNK blocks in float32: the same weights give the same average bits in every
mode, a `--replay-workers` replay included. The BN running statistics are the live model's (they are already a
moving average, of the batch statistics; averaging them again measured no better). To validate, the Trainer puts
the average in the store in place of the weights and asks the executor as usual (the workers evaluate it where
they read the weights: shared memory, or a full copy over sockets), then puts the live weights back. Validation
accuracy, best.npz and what predict/export/evaluate load are the average's; the live weights and momentum stay
the training state. Not with the mesh data plane (dist.plane = "mesh" on several hosts): there the coordinator
holds the weights only every dist.sync_every steps.
"""
from __future__ import annotations

import numpy as np

from .optim import CHUNK


def decay_for(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay of a moving average whose time constant is `ema_epochs` epochs (0: no averaging)."""
    if ema_epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)


class WeightAverage:
    """The running average of a model's weights (`params`, float32, starting as a copy of the given weights), and
    `live`, where the Trainer keeps the live weights while the average is evaluated in their place."""

    def __init__(self, params: np.ndarray, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.params = params.astype(np.float32, copy=True)
        self.live = np.empty_like(self.params)
        self._scratch = np.empty(min(CHUNK, params.size), np.float32)
        self._rate = np.float32(1.0 - decay)

    def update(self, params: np.ndarray) -> None:
        """avg += (1 - d) * (w - avg), block by block (three passes over a block while it sits in L2)."""
        for lo in range(0, params.size, CHUNK):
            avg = self.params[lo:lo + CHUNK]
            s = self._scratch[:avg.size]
            np.subtract(params[lo:lo + CHUNK], avg, out=s)
            s *= self._rate
            avg += s
