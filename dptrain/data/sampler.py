"""Which images form each global batch, and which part of a batch each rank takes.

Everything here is a pure function of (seed, epoch, n): the coordinator's sampler state is just (epoch, step in
epoch), a resume recomputes the same batches, and any number of workers sees the same global batches.

- The epoch order is a permutation of the training indices drawn from np.random.default_rng([seed, epoch, TAG]).
- `batches(epoch)` cuts it into global batches of `batch_size` (the last one dropped when incomplete and
  drop_last), at most `steps_per_epoch` of them when that is > 0.
- `shard(batch, rank, world_size)` is a contiguous slice; sizes differ by at most one (the first
  len % world_size ranks take one more), and concatenating shards in rank order gives the batch back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG = 0x5A3B1E  # separates the sampler's stream from other users of (seed, epoch)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous part of n items."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    start, stop = shard_bounds(len(batch), rank, world_size)
    return batch[start:stop]


def epoch_permutation(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training indices in this epoch's order."""
    indices = np.asarray(indices, np.int64)
    return indices[np.random.default_rng([seed, epoch, _TAG]).permutation(len(indices))]


@dataclass(frozen=True)
class Sampler:
    indices: np.ndarray  # int64 training indices (into the image array)
    batch_size: int  # global batch size
    seed: int = 0
    drop_last: bool = True  # drop the last incomplete batch
    steps_per_epoch: int = 0  # cap on batches per epoch (0: no cap)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def num_steps(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        n = len(self.indices)
        steps = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(steps, self.steps_per_epoch) if self.steps_per_epoch > 0 else steps

    def batches(self, epoch: int) -> list[np.ndarray]:
        order = epoch_permutation(self.indices, self.seed, epoch)
        bs = self.batch_size
        return [order[i * bs:(i + 1) * bs] for i in range(self.num_steps())]

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """Global batch `step` of `epoch` (what the coordinator sends out)."""
        if not 0 <= step < self.num_steps():
            raise IndexError(f"step {step} out of range: epoch has {self.num_steps()} steps")
        order = epoch_permutation(self.indices, self.seed, epoch)
        return order[step * self.batch_size:(step + 1) * self.batch_size]
