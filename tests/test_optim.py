"""optim.py against references: the schedule against its closed form written out here; SGD against a hand-written
float64 loop and against torch.optim.SGD(momentum, weight_decay) with clip_grad_norm_ over several steps; weight
decay against the model's own list of which tensors decay; the Trainer's clip against ‖g‖ computed in float64 over
every parameter; sum_of_squares against math.fsum."""
import math

import numpy as np
import pytest
from gradcheck import rel_error
from helpers import make_config

from dptrain.compute import shard_gradient
from dptrain.data.dataset import Dataset
from dptrain.executors import LocalExecutor
from dptrain.optim import CHUNK, FOLD, SGD, chunk_squares, clip_factor, lr_at, sum_of_squares
from dptrain.train import Trainer

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2


# ---- schedule ----------------------------------------------------------------------------------------------------
def _lr_reference(step, base, warmup, total, min_lr):
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("base,warmup,total,min_lr", [(0.1, 10, 200, 0.0), (0.05, 3, 40, 1e-3), (1.0, 0, 50, 0.1),
                                                       (0.2, 1, 2, 0.0)])
def test_lr_schedule_shape(base, warmup, total, min_lr):
    lrs = [lr_at(s, base_lr=base, warmup_steps=warmup, total_steps=total, min_lr=min_lr) for s in range(total + 5)]
    ref = [_lr_reference(s, base, warmup, total, min_lr) for s in range(total + 5)]
    np.testing.assert_allclose(lrs, ref, rtol=1e-12, atol=0)
    if warmup:
        assert lrs[0] == pytest.approx(base / warmup)  # never 0 at step 0
        assert lrs[warmup - 1] == pytest.approx(base)  # peak reached on the last warmup step
        assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # strictly rising
    assert lrs[warmup] == pytest.approx(base)  # decay starts from the peak
    decay = lrs[warmup:total + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotonic decay
    assert lrs[total] == pytest.approx(min_lr, abs=1e-12)  # cosine end
    assert lrs[total - 1] - min_lr <= (base - min_lr) * (math.pi / max(1, total - warmup)) ** 2 / 4 + 1e-12
    assert all(lr == pytest.approx(min_lr, abs=1e-12) for lr in lrs[total:])  # stays at the floor afterwards
    assert min(lrs) >= min_lr - 1e-12 and max(lrs) <= base + 1e-12


# ---- SGD ---------------------------------------------------------------------------------------------------------
def _sgd_reference(w, grads_seq, lrs, scales, mu, wd, ranges):
    """The PyTorch convention spelled out in float64: d = s*g + wd*w (decayed entries), v = mu*v + d, w -= lr*v."""
    w = w.astype(np.float64).copy()
    v = np.zeros_like(w)
    mask = np.zeros(w.size, bool)
    for a, b in ranges:
        mask[a:b] = True
    for g, lr, s in zip(grads_seq, lrs, scales):
        d = g.astype(np.float64) * s + wd * w * mask
        v = mu * v + d
        w = w - lr * v
    return w, v


RANGES = [(0, 40), (55, 90), (100, 101)]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_sgd_matches_float64_reference(dtype, tol):
    rng = np.random.default_rng(0)
    n, mu, wd = 120, 0.9, 0.01
    w0 = rng.standard_normal(n).astype(dtype)
    grads_seq = [rng.standard_normal(n).astype(dtype) for _ in range(6)]
    lrs, scales = [0.1, 0.05, 0.2, 0.0, 0.1, 0.01], [1.0, 0.5, 1.0, 0.3, 1.0, 0.9]
    opt = SGD(n, momentum=mu, weight_decay=wd, decay_ranges=RANGES, dtype=dtype)
    w = w0.copy()
    for g, lr, s in zip(grads_seq, lrs, scales):
        opt.step(w, g.copy(), lr, scale=s)
    w_ref, v_ref = _sgd_reference(w0, grads_seq, lrs, scales, mu, wd, RANGES)
    assert rel_error(w, w_ref) < tol and rel_error(opt.velocity, v_ref) < tol


def test_sgd_slices_equal_whole_update():
    """step(lo, hi) over a partition (what a distributed coordinator may do) equals one step over everything."""
    rng = np.random.default_rng(1)
    n = 120
    w0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    whole, parts = SGD(n, momentum=0.9, weight_decay=0.1, decay_ranges=RANGES), \
        SGD(n, momentum=0.9, weight_decay=0.1, decay_ranges=RANGES)
    w1, w2 = w0.copy(), w0.copy()
    for _ in range(3):
        whole.step(w1, g.copy(), 0.1, scale=0.7)
        g2 = g.copy()
        for lo, hi in [(0, 37), (37, 56), (56, 100), (100, 120)]:
            parts.step(w2, g2, 0.1, scale=0.7, lo=lo, hi=hi)
    assert np.array_equal(w1, w2) and np.array_equal(whole.velocity, parts.velocity)


def test_sgd_and_clip_match_torch():
    """Our clip (sum_of_squares + clip_factor) + SGD vs clip_grad_norm_ + torch.optim.SGD, two param groups (decay and
    no decay), a changing LR, and gradients large enough that some steps clip and some do not."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n, mu, wd, clip = 90, 0.9, 5e-3, 4.0
    ranges = [(0, 30), (60, 90)]
    w0 = rng.standard_normal(n)
    w = w0.copy()
    opt = SGD(n, momentum=mu, weight_decay=wd, decay_ranges=ranges, dtype=np.float64)
    tw = [torch.tensor(w0[a:b], dtype=torch.float64, requires_grad=True) for a, b in [(0, 30), (30, 60), (60, 90)]]
    topt = torch.optim.SGD([{"params": [tw[0], tw[2]], "weight_decay": wd}, {"params": [tw[1]], "weight_decay": 0.0}],
                           lr=0.1, momentum=mu)
    clipped = 0
    for k in range(8):
        g = rng.standard_normal(n) * (0.2 if k % 2 else 1.5)  # norm ~1.9 or ~14: alternately below/above clip
        lr = 0.1 * (k + 1) / 8
        norm = math.sqrt(sum_of_squares(g))
        s = clip_factor(norm, clip)
        clipped += s < 1.0
        opt.step(w, g.copy(), lr, scale=s)
        for t, (a, b) in zip(tw, [(0, 30), (30, 60), (60, 90)]):
            t.grad = torch.tensor(g[a:b], dtype=torch.float64)
        tnorm = float(torch.nn.utils.clip_grad_norm_(tw, clip))
        assert norm == pytest.approx(tnorm, rel=1e-12)  # both report the pre-clip norm
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
    assert 0 < clipped < 8
    w_torch = torch.cat([t.detach() for t in tw]).numpy()
    assert rel_error(w, w_torch) < 1e-12


# ---- weight decay ranges and clipping, wired through the Trainer -----------------------------------------------
def _tiny_trainer(tmp_path, **train):
    cfg = make_config({"data.image_size": 8, "data.augment": False, "model.widths": [4], "model.res_width": 4,
                       "model.hidden": 6, "train.out": tmp_path, "train.batch_size": 8, "train.progress": False}
                      | {f"train.{k}": v for k, v in train.items()})
    rng = np.random.default_rng(3)
    n = 24
    ds = Dataset(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 3, ["a", "b", "c"],
                 np.arange(16), np.arange(16, 24), [], "fp")
    return Trainer(cfg, ds)


@pytest.mark.parametrize("decay_bn_and_bias", [False, True])
def test_weight_decay_only_on_decay_ranges(tmp_path, decay_bn_and_bias):
    """Zero gradient, no momentum: one step moves exactly the decayed entries, by -lr*wd*w."""
    tr = _tiny_trainer(tmp_path, decay_bn_and_bias=decay_bn_and_bias, momentum=0.0, weight_decay=0.1)
    store = tr.store
    names_no_decay = {p.name for p in store.param_list if not p.decay}
    assert any(".bn." in nm or nm.endswith(("gamma", "beta")) for nm in names_no_decay), names_no_decay
    assert any(nm.endswith(("b", "bias")) for nm in names_no_decay), names_no_decay
    assert all(p.decay == (p.data.ndim > 1) for p in store.param_list)  # matrices/kernels decay, vectors do not
    w0 = store.params.copy()
    store.grads[...] = 0
    tr.opt.step(store.params, store.grads, 0.5)
    for p in store.param_list:
        before = w0[p.offset:p.offset + p.size]
        decays = p.decay or decay_bn_and_bias
        expect = before - np.float32(0.5) * (np.float32(0.1) * before) if decays else before
        np.testing.assert_allclose(p.data.ravel(), expect, rtol=1e-6, err_msg=p.name)
        assert decays or np.array_equal(p.data.ravel(), before), p.name


@pytest.mark.parametrize("clip_norm", [1e-3, 1e6, 0.0])
def test_trainer_clips_global_norm_of_all_params(tmp_path, clip_norm):
    """A step reports the pre-clip norm over every parameter and scales the whole gradient by clip/norm."""
    tr = _tiny_trainer(tmp_path, clip_norm=clip_norm, momentum=0.0, weight_decay=0.0, warmup_epochs=0.0)
    ex = LocalExecutor(tr.cfg, tr.model, tr.ds, tr.store, tr.opt)
    idx = tr.sampler.batches(0)[0]
    shard_gradient(tr.model, tr.ds.images, tr.ds.labels, idx, epoch=0, global_count=len(idx), data=tr.cfg.data,
                   seed=tr.cfg.train.seed)  # the gradient the step will compute, before the step scales it
    g = tr.store.grads.astype(np.float64)
    w0 = tr.store.params.astype(np.float64)
    lr = tr.lr()
    norm = ex.train_step(idx, 0, 0, lr).grad_norm
    assert lr == pytest.approx(tr.cfg.train.lr)
    assert norm == pytest.approx(math.sqrt(math.fsum(g * g)), rel=1e-6)
    # the largest per-tensor norm is well below the global one: a per-tensor clip would not match this
    assert max(np.linalg.norm(p.grad) for p in tr.store.param_list) < norm
    factor = clip_norm / (norm + 1e-6) if 0 < clip_norm < norm else 1.0
    # with momentum 0 the velocity is exactly the step's (clipped) gradient; the weights moved by -lr * it
    np.testing.assert_allclose(tr.opt.velocity, factor * g, rtol=1e-6, atol=1e-6 * factor * np.abs(g).max())
    np.testing.assert_allclose(tr.store.params - w0, -lr * factor * g, rtol=1e-4, atol=1.2e-7 * np.abs(w0).max())
    if clip_norm == 1e-3:
        assert factor < 1e-2


def test_clip_factor():
    assert clip_factor(10.0, 5.0) == pytest.approx(0.5, rel=1e-6)
    assert clip_factor(4.0, 5.0) == 1.0 and clip_factor(5.0, 5.0) == 1.0
    assert clip_factor(1e9, 0.0) == 1.0  # clipping off
    assert clip_factor(0.0, 1.0) == 1.0


# ---- sum of squares ------------------------------------------------------------------------------------------------
def gamma(k: int, u: float = 2.0 ** -53) -> float:
    """Higham's γ(k) = k·u / (1 - k·u): the relative error bound of k roundings of a sum of non-negative terms."""
    return k * u / (1 - k * u)


def test_sum_of_squares_float64_accurate():
    """The bound of optim.sum_of_squares' docstring, which holds whatever order any kernel adds in: a square meets at
    most FOLD roundings in float32 (the square, the column additions), then CHUNK / FOLD - 1 in the float64 sum of
    the columns and B - 1 adding the blocks; math.fsum's reference is correctly rounded (one more float64 u). The
    float32 dot per block used before missed it with OpenBLAS's AVX2 kernels (1.25e-6 here)."""
    rng = np.random.default_rng(4)
    g = (rng.standard_normal((1 << 21) + 12345) * 1e-2).astype(np.float32)  # 33 chunks, the last one partial
    g[::1000] = 3.0  # a few large entries among many small ones
    exact = math.fsum((g.astype(np.float64) ** 2).tolist())
    blocks = -(-g.size // CHUNK)
    bound = (1 + gamma(FOLD, 2.0 ** -24)) * (1 + gamma(CHUNK // FOLD + blocks - 1)) - 1  # 4.8e-7
    assert abs(sum_of_squares(g) - exact) / exact <= bound
    wide = g.astype(np.float64)  # float64 input: all in float64, at most CHUNK - 1 + B roundings (the partial block)
    assert abs(sum_of_squares(wide) - exact) / exact <= gamma(CHUNK + blocks)
    tiny = np.full(CHUNK, 1e-21, np.float32)  # squares underflow float32 (subnormal): redone in float64
    assert sum_of_squares(tiny) == pytest.approx(CHUNK * float(tiny[0]) ** 2, rel=gamma(CHUNK))
    assert sum_of_squares(np.zeros(0, np.float32)) == 0.0
    assert sum_of_squares(np.array([3.0, 4.0], np.float32)) == 25.0
    big = np.full(10, 1e30, np.float32)  # squares overflow float32 but not float64
    assert sum_of_squares(big) == 10 * float(big[0]) ** 2  # exact: a square has 48 bits, 10 of them 52


def test_sum_of_squares_same_bits_any_threads_and_alignment():
    """The block sums are what workers, agents and the coordinator compute on their slices and compare bitwise: they
    must not depend on the BLAS or nn thread count (a BLAS dot splits over its threads) or on where the buffer
    starts."""
    from threadpoolctl import threadpool_limits

    from dptrain.nn import threads
    g = (np.random.default_rng(5).standard_normal(5 * CHUNK + 77) * 1e-2).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        one = chunk_squares(g)
    prev = threads.set_threads(3)
    try:
        with threadpool_limits(3, user_api="blas"):
            assert np.array_equal(chunk_squares(g), one)
    finally:
        threads.set_threads(prev)
    shifted = np.empty(g.size + 1, np.float32)[1:]  # 4 bytes off the allocator's alignment
    shifted[...] = g
    assert np.array_equal(chunk_squares(shifted), one)
    assert np.array_equal(chunk_squares(g[2 * CHUNK:]), one[2:])  # a worker's slice: the same entries
