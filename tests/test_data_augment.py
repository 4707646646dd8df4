"""make_batch against a plain per-sample reference (np.roll-free loop with edge padding), and against itself
sharded: the global batch must be bitwise identical however it is split."""
import numpy as np
import pytest

from dptrain.data.augment import augment_params, make_batch


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (300, 24, 24, 3), dtype=np.uint8)


def reference(images, indices, epoch, seed, max_shift):
    flip, dy, dx = augment_params(seed, epoch, indices, max_shift)
    S = images.shape[1]
    out = []
    for i, f, y, x in zip(indices, flip, dy, dx):
        im = np.pad(images[i], ((max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode="edge")
        im = im[max_shift - y:max_shift - y + S, max_shift - x:max_shift - x + S]
        out.append(im[:, ::-1] if f else im)
    return ((np.stack(out).astype(np.float64) / 255 - 0.5) / 0.25)


def test_matches_reference_and_normalises(images):
    idx = np.array([5, 7, 5, 299, 0, 42, 42, 100])
    got = make_batch(images, idx, epoch=3, seed=1, augment=True, max_shift=3)
    assert got.dtype == np.float32 and got.shape == (8, 24, 24, 3)
    np.testing.assert_allclose(got, reference(images, idx, 3, 1, 3), atol=1e-6)
    plain = make_batch(images, idx)
    np.testing.assert_allclose(plain, (images[idx] / 255 - 0.5) / 0.25, atol=1e-6)
    assert -2.0 <= plain.min() and plain.max() <= 2.0


def test_shard_invariant_bitwise_and_deterministic(images):
    idx = np.random.default_rng(1).permutation(300)[:64]
    full = make_batch(images, idx, epoch=2, seed=9, augment=True, max_shift=4)
    for k in (1, 17, 32, 63):
        parts = np.concatenate([make_batch(images, idx[:k], epoch=2, seed=9, augment=True, max_shift=4),
                                make_batch(images, idx[k:], epoch=2, seed=9, augment=True, max_shift=4)])
        assert np.array_equal(full, parts)
    out = np.empty_like(full)
    assert make_batch(images, idx, epoch=2, seed=9, augment=True, max_shift=4, out=out) is out
    assert np.array_equal(out, full)
    assert not np.array_equal(full, make_batch(images, idx, epoch=3, seed=9, augment=True, max_shift=4))
    assert not np.array_equal(full, make_batch(images, idx, epoch=2, seed=10, augment=True, max_shift=4))


def test_flips_and_shifts_happen_evenly(images):
    idx = np.arange(4000)
    flip, dy, dx = augment_params(0, 0, idx, 4)
    assert 0.45 < flip.mean() < 0.55
    assert set(np.unique(dy)) == set(range(-4, 5)) == set(np.unique(dx))
    assert abs(dx.mean()) < 0.2 and abs(dy.mean()) < 0.2
    # some sample with a flip and no shift must come out exactly mirrored, one with a shift but no flip shifted
    small = np.random.default_rng(2).integers(0, 256, (4000, 8, 8, 3), dtype=np.uint8)
    i = int(np.flatnonzero(flip & (dx == 0) & (dy == 0))[0])
    got = make_batch(small, [i], augment=True, max_shift=4)[0]
    np.testing.assert_allclose(got, (small[i, :, ::-1] / 255 - 0.5) / 0.25, atol=1e-6)
    j = int(np.flatnonzero(~flip & (dx == 2) & (dy == 0))[0])
    got = make_batch(small, [j], augment=True, max_shift=4)[0]
    np.testing.assert_allclose(got[:, 2:], (small[j, :, :-2] / 255 - 0.5) / 0.25, atol=1e-6)


def test_readonly_noncontiguous_input(images):
    ro = images.copy()
    ro.flags.writeable = False
    idx = np.arange(10)
    a = make_batch(ro, idx, epoch=1, augment=True)
    b = make_batch(np.asfortranarray(images), idx, epoch=1, augment=True)
    assert np.array_equal(a, b)
