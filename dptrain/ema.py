"""An exponential moving average of the weights (Polyak averaging, "model EMA"), the model that is evaluated.

    avg = avg + (1 - d) * (w - avg)      after every optimizer step, d = 1 - 1 / (train.ema_epochs * steps_per_epoch)

The horizon is given in epochs, so a default does not depend on the dataset's size or the batch. The average is
taken by the Trainer from the weights each step leaves (whoever applied it: this process, the workers in shared
memory, the coordinator), in fixed CHUNK blocks in float32: the same weights give the same average bits in every
mode, a `--replay-workers` replay included. The BN running statistics are the live model's (they are already a
moving average, of the batch statistics; averaging them again did no better in our runs). To validate, the Trainer puts
the average in the store in place of the weights and asks the executor as usual (the workers evaluate it where
they read the weights: shared memory, or a full copy over sockets), then puts the live weights back. Validation
accuracy, best.npz and what predict/export/evaluate load are the average's; the live weights and momentum stay
the training state. Not with the mesh data plane (dist.plane = "mesh" on several hosts): there the coordinator
holds the weights only every dist.sync_every steps.

With the workers updating the weights in shared memory (one host, dist.update = "workers"), they keep the average
too, each on the slice it has just updated (`blend`, the same elementwise operations: the same bits), in a double
buffer like the weights' (a step that fails half-way is redone from the untouched half); the coordinator's serial
part of a step then does not grow with the model.
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
        self.rate = np.float32(1.0 - decay)  # what every update multiplies by (the workers get it in UPDATE)

    def update(self, params: np.ndarray) -> None:
        """avg += (1 - d) * (w - avg), in place."""
        blend(self.params, params, self.rate, self.params, 0, params.size, self._scratch)


def blend(avg: np.ndarray, params: np.ndarray, rate: np.float32, out: np.ndarray, lo: int, hi: int,
          scratch: np.ndarray | None = None) -> None:
    """out[lo:hi] = avg + rate * (params - avg) over [lo, hi), block by block (three passes over a block while it
    sits in L2); out may be avg (in place). Elementwise, so any split into slices gives the same bits."""
    rate = np.float32(rate)
    s_buf = scratch if scratch is not None else np.empty(min(CHUNK, max(hi - lo, 1)), np.float32)
    for a in range(lo, hi, CHUNK):
        b = min(hi, a + CHUNK)
        s = s_buf[:b - a]
        np.subtract(params[a:b], avg[a:b], out=s)
        s *= rate
        np.add(avg[a:b], s, out=out[a:b])
