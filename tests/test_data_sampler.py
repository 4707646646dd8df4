"""The sampler against its definition: pure in (seed, epoch, n), shards contiguous with sizes within one,
concatenating in rank order to the global batch."""
import numpy as np
import pytest

from dptrain.data.sampler import Sampler, shard, shard_bounds


@pytest.mark.parametrize("n", [0, 1, 5, 63, 64, 65])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_cover_batch_sizes_within_one(n, world_size):
    batch = np.arange(100, 100 + n)
    parts = [shard(batch, r, world_size) for r in range(world_size)]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert np.array_equal(np.concatenate(parts), batch)
    with pytest.raises(ValueError):
        shard_bounds(n, world_size, world_size)


def test_batches_are_pure_and_respect_options():
    idx = np.arange(0, 200, 2)  # 100 training indices
    s = Sampler(idx, batch_size=32, seed=5)
    b0 = s.batches(0)
    assert [len(b) for b in b0] == [32, 32, 32] and s.num_steps() == 3
    assert np.array_equal(np.concatenate(b0), np.concatenate(Sampler(idx.copy(), 32, seed=5).batches(0)))
    assert not np.array_equal(np.concatenate(b0), np.concatenate(s.batches(1)))
    assert np.array_equal(s.batch(0, 2), b0[2])
    full = Sampler(idx, 32, seed=5, drop_last=False).batches(0)
    assert [len(b) for b in full] == [32, 32, 32, 4]
    assert np.array_equal(np.sort(np.concatenate(full)), idx)  # a permutation of the training indices
    assert len(Sampler(idx, 32, seed=5, steps_per_epoch=2).batches(0)) == 2
    with pytest.raises(IndexError):
        s.batch(0, 3)
