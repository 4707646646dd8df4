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

from .nn.threads import split_rows


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to base_lr over warmup_steps
    (step 0 already gets base_lr / warmup_steps, never 0), then a cosine decay to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


CHUNK = 1 << 16  # elements per block: w, g, v and a scratch block (1 MiB) stay in L2 between the vector ops
FOLD = 8  # a block's squares are added in columns of FOLD in g's dtype, then the CHUNK / FOLD column sums in float64
TINY = 2.0 ** -100  # a block whose sum is below this is redone in float64: its float32 squares may have underflowed


def chunk_slices(size: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) slices of range(size) for n owners (workers, hosts), on CHUNK boundaries (so the blocks of the sum
    of squares are the same as one process's), as even as the blocks allow; trailing slices may be empty."""
    blocks = -(-size // CHUNK)
    return [(min(size, blocks * r // n * CHUNK), min(size, blocks * (r + 1) // n * CHUNK)) for r in range(n)]


def chunk_squares(g: np.ndarray) -> np.ndarray:
    """Σ g² of every CHUNK-element block of g (float64, one per block). Blocks are independent, so a slice starting
    on a block boundary gives exactly the entries of the whole array's list: workers can each take a slice and the
    sums still match. A whole block is squared into a buffer of this call's own, its FOLD rows of CHUNK / FOLD are
    added elementwise in g's dtype, and the column sums are added by NumPy's float64 reduction; a partial last block,
    or one whose squares overflow or may have underflowed (a sum below TINY), is squared and added in float64 (exact
    squares of float32 values). No BLAS call: the bits depend on neither the BLAS thread count (a BLAS dot splits
    over its threads) nor on where g starts. One thread (a split over the nn threads did not pay where it was
    measured: docs/reproducibility.md). Error bound: `sum_of_squares`."""
    parts = np.empty(-(-g.size // CHUNK), np.float64)
    sq = np.empty(min(CHUNK, g.size), g.dtype)
    rows = sq.reshape(FOLD, -1) if sq.size == CHUNK else None
    cols = np.empty(CHUNK // FOLD, g.dtype)
    with np.errstate(over="ignore", under="ignore"):  # caught below and redone
        for i in range(parts.size):
            part = g[i * CHUNK:(i + 1) * CHUNK]
            if part.size == CHUNK:
                np.square(part, out=sq)
                # one call for the FOLD - 1 row additions: a reduction over the outer axis adds the rows in order,
                # ((r0 + r1) + r2) + ..., the same bits as a loop of np.add (the call overhead was half the time)
                np.add.reduce(rows, axis=0, out=cols)
                parts[i] = np.add.reduce(cols, dtype=np.float64)
            if part.size < CHUNK or not (TINY <= parts[i] < math.inf):  # NaN too: it stays NaN
                wide = part.astype(np.float64)  # float32 x: x² is exact in float64 (24 + 24 bits <= 53)
                parts[i] = np.einsum("i,i->", wide, wide)
    return parts


def sum_of_squares(g: np.ndarray) -> float:
    """Σ g²: the block sums of `chunk_squares`, added by `add_blocks`.

    Error bound, whatever order any kernel adds in (the terms are >= 0, so k roundings of relative size <= u each
    cost at most γ(k) = k·u / (1 - k·u) of the sum; u = 2⁻²⁴ in float32, 2⁻⁵³ in float64): a square of a whole block
    meets at most FOLD roundings in g's dtype (the square, FOLD - 1 column additions), then at most CHUNK / FOLD - 1
    in the float64 sum of the columns and B - 1 in adding the B block sums; so for float32 g
        |computed - Σ g²| <= ((1 + γ32(FOLD))·(1 + γ64(CHUNK / FOLD + B - 2)) - 1)·Σ g²,
    a relative 4.8e-7 (tests/test_optim.py checks it). Underflow is the one exception to relative bounds: a float32
    square below 2⁻¹²⁶ errs by up to 2⁻¹⁵⁰ absolute, so a block's CHUNK of them by 2⁻¹³⁴, a relative 2⁻³⁴ of any
    block sum >= TINY; smaller sums, partial and overflowed blocks are exact float64 squares summed with at most
    CHUNK - 1 roundings: within γ64(CHUNK) = 7.3e-12. The clip factor and the logged norm need ~6 digits. A float32
    dot per block (as before) errs by up to γ32(CHUNK) = 3.9e-3, and by how much in practice depends on the BLAS
    kernel's accumulators (docs/reproducibility.md)."""
    return add_blocks(chunk_squares(g))


def add_blocks(parts: np.ndarray) -> float:
    """Block sums added in block order, whoever computed them (this process, or the workers slice by slice)."""
    total = 0.0
    for x in parts:
        total += float(x)
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
        self._scratch = np.empty(min(num_params, CHUNK), dtype)

    def _blocks(self, lo: int, hi: int):
        """[a, b) blocks of CHUNK elements over [lo, hi), each with its decay sub-ranges relative to a."""
        for a in range(lo, hi, CHUNK):
            b = min(a + CHUNK, hi)
            yield a, b, [(max(x, a) - a, min(y, b) - a) for x, y in self.decay_ranges if x < b and y > a]

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float, scale: float = 1.0,
             lo: int = 0, hi: int | None = None, params_out: np.ndarray | None = None,
             velocity_in: np.ndarray | None = None, velocity_out: np.ndarray | None = None) -> None:
        """One update of params[lo:hi] with grads[lo:hi] * scale (scale = clip factor), in place by default.
        `grads` is modified (it receives the weight-decay term). With params_out / velocity_in / velocity_out the
        new weights and velocity go to other arrays and the old ones stay as they were (a double buffer that a
        failed step can fall back on); the bits are the same either way. Done block by block so that the five
        vector operations touch memory once instead of five times (the update is bandwidth-bound), the blocks split
        over the nn threads (elementwise: the same bits)."""
        hi = params.size if hi is None else hi
        w_out = params if params_out is None else params_out
        v_in = self.velocity if velocity_in is None else velocity_in
        v_out = v_in if velocity_out is None else velocity_out
        dt = params.dtype.type
        scale, wd, mu, lr = dt(scale), dt(self.weight_decay), dt(self.momentum), dt(lr)

        def blocks(i0: int, i1: int) -> None:  # blocks i0..i1 of [lo, hi); elementwise: any split, the same bits
            tmp_all = self._scratch if i0 == 0 else np.empty(CHUNK, self._scratch.dtype)  # the caller's, or its own
            for a, b, decay in self._blocks(lo + i0 * CHUNK, min(hi, lo + i1 * CHUNK)):
                w, g, tmp = params[a:b], grads[a:b], tmp_all[:b - a]
                if scale != 1:
                    g *= scale
                if wd:
                    for x, y in decay:
                        np.multiply(w[x:y], wd, out=tmp[x:y])
                        g[x:y] += tmp[x:y]
                v = v_out[a:b]
                np.multiply(v_in[a:b], mu, out=v)
                v += g
                np.multiply(v, lr, out=tmp)
                np.subtract(w, tmp, out=w_out[a:b])
        split_rows(blocks, -(-(hi - lo) // CHUNK), hi - lo)  # over the nn threads (one: in this thread)


def sgd_for(store, t, velocity: np.ndarray | None = None) -> SGD:
    """The run's optimizer over a ParamStore `store` from its train config `t` (weight decay on weights only, or on
    everything with t.decay_bn_and_bias): the one recipe for the trainer, the workers and the host agents."""
    ranges = [(0, store.num_params)] if t.decay_bn_and_bias else store.decay_ranges()
    return SGD(store.num_params, momentum=t.momentum, weight_decay=t.weight_decay, decay_ranges=ranges,
               velocity=velocity)


def clipped_step(opt: SGD, params: np.ndarray, grads: np.ndarray, lr: float, clip_norm: float, step: int) -> float:
    """The whole update of one step in one process: the global norm, the clip, SGD. Returns the pre-clip norm."""
    norm = math.sqrt(sum_of_squares(grads))
    opt.step(params, grads, lr, scale=checked_clip(norm, clip_norm, step))
    return norm


def checked_clip(norm: float, clip_norm: float, step: int) -> float:
    """clip_factor, after refusing a non-finite norm (a diverged loss) before any weight changes."""
    if not math.isfinite(norm):
        raise FloatingPointError(f"step {step}: gradient norm is {norm} (loss diverged; lower --lr)")
    return clip_factor(norm, clip_norm)
