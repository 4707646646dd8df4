"""Batches: uint8 images -> float32 NHWC, normalised, optionally augmented, seeded per sample.

Normalisation: x = (u8 / 255 - 0.5) / 0.25, i.e. u8 / 63.75 - 2, one constant for every channel (pixels in
[-2, 2], roughly zero mean and unit variance on natural images; per-channel constants would tie the model to one
dataset's statistics for little gain).

Augmentation: random horizontal flip (p = 1/2) and a random translation by dy, dx in [-max_shift, max_shift],
with edge padding (border pixels are repeated, so no artificial black frame appears). The draws for sample i
depend only on (seed, epoch, i), where i is the global index of the image: a vectorised SplitMix64 hash of
those three numbers. So a global batch is bitwise identical however it is sharded across workers:
make_batch(x, idx) == concat(make_batch(x, idx[:k]), make_batch(x, idx[k:])). SplitMix64 over the batch is a few
vectorised passes, where one np.random.default_rng per sample would pay a generator's construction per image.

The flip and shift are one gather (shift, then mirror):
out[b, y, x] = img[idx[b], clip(y - dy_b), clip(flip_b(x) - dx_b)], so augmentation costs one copy of the batch.
"""
from __future__ import annotations

import numpy as np

MEAN, STD = 0.5, 0.25  # of x / 255, the same for every channel
_SCALE = np.float32(1.0 / (255.0 * STD))
_OFFSET = np.float32(MEAN / STD)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise over uint64 (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_hash(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One 64-bit random word per sample, a function of (seed, epoch, index) only."""
    k = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))
    k = splitmix64(k ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    return splitmix64(k ^ np.asarray(indices, np.int64).astype(np.uint64))


def augment_params(seed: int, epoch: int, indices: np.ndarray, max_shift: int) -> tuple[np.ndarray, ...]:
    """(flip bool (B,), dy int64 (B,), dx int64 (B,)) for the given global sample indices."""
    h = sample_hash(seed, epoch, indices)
    flip = (h >> np.uint64(63)).astype(bool)
    span = np.uint64(2 * max_shift + 1)
    dy = ((h >> np.uint64(20)) & np.uint64(0xFFFFF)) % span  # 20-bit fields: modulo bias < 2e-5
    dx = (h & np.uint64(0xFFFFF)) % span
    return flip, dy.astype(np.int64) - max_shift, dx.astype(np.int64) - max_shift


def normalize(x_u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 -> float32 (x / 255 - MEAN) / STD."""
    out = np.multiply(x_u8, _SCALE, out=out, dtype=np.float32)
    out -= _OFFSET
    return out


def make_batch(images_u8: np.ndarray, indices: np.ndarray, *, epoch: int = 0, seed: int = 0, augment: bool = False,
               max_shift: int = 4, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (B, S, S, 3) batch of images_u8[indices] (N, S, S, 3), augmented per sample when asked.

    `out`, if given, must be float32 (B, S, S, 3) and is filled and returned (no allocation).
    """
    indices = np.asarray(indices, np.int64)
    if not augment:
        return normalize(images_u8[indices], out)
    H, W = images_u8.shape[1:3]
    flip, dy, dx = augment_params(seed, epoch, indices, max(0, max_shift))
    ys = np.clip(np.arange(H)[None, :] - dy[:, None], 0, H - 1)  # (B, H) source rows
    cols = np.arange(W)[None, :]
    # shift, then mirror the shifted image: out[x] = shifted[W-1-x] = img[W-1-x-dx]
    xs = np.clip(np.where(flip[:, None], W - 1 - cols, cols) - dx[:, None], 0, W - 1)  # (B, W) source columns
    if not images_u8.flags.c_contiguous:  # a reshape would copy the whole set: index it directly instead
        return normalize(images_u8[indices[:, None, None], ys[:, :, None], xs[:, None, :]], out)
    N = images_u8.shape[0]
    pixels = images_u8.reshape(N * H * W, -1)  # (N*H*W, 3); a view for contiguous images
    flat = (indices[:, None, None] * (H * W) + ys[:, :, None] * W) + xs[:, None, :]  # (B, H, W)
    # np.take over rows of 3 bytes: one flat index per pixel, much faster than the equivalent 3-D fancy index.
    gathered = np.take(pixels, flat, axis=0)  # (B, H, W, 3)
    return normalize(gathered, out)
