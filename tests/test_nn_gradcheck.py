"""Every kernel's analytic gradient against centred finite differences in float64 (rel error < 1e-6), over a loop of
shapes, strides, paddings and kernel sizes; max-pool ties and BN moments / running statistics / eval mode against
hand-written expectations; the whole small model's gradient against finite differences; SyncBatchNorm over shards
against the single-process full batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from gradcheck import check_kernel, numeric_grad, rel_error
from helpers import small_model

from dptrain.config import ModelConfig
from dptrain.nn import conv, functional, norm, pool
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.workspace import Workspace

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2

TOL = 1e-6

CONV_CASES = [  # (N, H, W, C, F, k, stride, pad)
    (2, 5, 6, 3, 4, 3, 1, 1), (1, 7, 5, 2, 3, 3, 2, 1), (2, 6, 6, 3, 2, 1, 1, 0), (1, 7, 6, 2, 3, 1, 2, 0),
    (1, 8, 7, 2, 2, 5, 1, 2), (2, 9, 8, 1, 3, 5, 2, 2), (1, 6, 7, 2, 3, 3, 1, 0), (1, 5, 5, 2, 2, 3, 2, 2),
    (1, 5, 6, 2, 3, 1, 1, 1), (1, 6, 5, 2, 2, 3, 1, 2), (1, 6, 6, 3, 2, 5, 1, 1),  # dx via col2im / flipped conv
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(case, bias):
    N, H, W, C, Fo, k, s, p = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((N, H, W, C))
    w = rng.standard_normal((k, k, C, Fo))
    b = rng.standard_normal(Fo) if bias else None
    ws = Workspace()
    check_kernel(conv.conv2d_forward, lambda d, c: conv.conv2d_backward(d, c, ws=ws), (x, w, b), s, p, ws)


def test_conv2d_writes_into_grad_views_and_skips_dx():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    out, cache = conv.conv2d_forward(x, w, b, 1, 1)
    dout = rng.standard_normal(out.shape)
    dw_ref, db_ref = conv.conv2d_backward(dout, cache)[1:]
    dw_out, db_out = np.full_like(w, 7.0), np.full_like(b, 7.0)
    dx, dw, db = conv.conv2d_backward(dout, cache, need_dx=False, dw_out=dw_out, db_out=db_out)
    assert dx is None and dw is dw_out and db is db_out
    np.testing.assert_allclose(dw_out, dw_ref)
    np.testing.assert_allclose(db_out, db_ref)


POOL_CASES = [  # (N, H, W, C, k, stride)
    (2, 4, 6, 3, 2, 2), (1, 5, 7, 2, 2, 2), (1, 6, 6, 2, 3, 3), (1, 7, 5, 2, 3, 2), (2, 5, 5, 1, 2, 1),
]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool(case, kind):
    N, H, W, C, k, s = case
    rng = np.random.default_rng(sum(case))
    # distinct values spaced well beyond h, so finite differences never cross a max-pool tie
    x = rng.permutation(N * H * W * C).reshape(N, H, W, C) * 0.01 + rng.uniform(0, 1e-3, (N, H, W, C))
    kernels = ((pool.maxpool2d_forward, pool.maxpool2d_backward) if kind == "max"
               else (pool.avgpool2d_forward, pool.avgpool2d_backward))
    check_kernel(*kernels, (x,), k, s)


@pytest.mark.parametrize("H", [2, 3])  # fast 2x2 path and generic path
def test_maxpool_ties_go_to_first_element(H):
    for window, first in (([[0, 0], [0, 0]], (0, 0)), ([[1, 5], [5, 0]], (0, 1)), ([[1, 2], [5, 5]], (1, 0))):
        x = np.zeros((1, H, 2, 1))
        x[0, :2, :, 0] = window
        out, cache = pool.maxpool2d_forward(x, 2)
        dx = pool.maxpool2d_backward(np.ones_like(out), cache)
        expect = np.zeros((H, 2))
        expect[first] = 1
        assert dx[0, :, :, 0].tolist() == expect.tolist(), window


def test_relu():
    x = np.random.default_rng(3).standard_normal((3, 4, 5, 2))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_kernel(functional.relu_forward, functional.relu_backward, (x,))


@pytest.mark.parametrize("shape", [(5, 7), (3, 4)])
def test_linear(shape):
    rng = np.random.default_rng(4)
    N, D, O = 4, *shape
    check_kernel(functional.linear_forward, functional.linear_backward,
                 (rng.standard_normal((N, D)), rng.standard_normal((D, O)), rng.standard_normal(O)))


@pytest.mark.parametrize("n", [1, 5, 8, functional.SMALL_BATCH, functional.SMALL_BATCH + 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linear_dx_blocks_give_the_whole_product(n, dtype):
    """Few rows: dx is computed per block of w's rows (a partial last block here); the whole product either way."""
    rng = np.random.default_rng(n)
    dout, w = rng.standard_normal((n, 600)).astype(dtype), rng.standard_normal((1000, 600)).astype(dtype)
    dx = functional.linear_dx(dout, w)
    assert dx.dtype == dtype and dx.shape == (n, 1000) and dx.flags.c_contiguous
    np.testing.assert_allclose(dx, dout.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-12 if dtype == np.float64 else 1e-4, atol=1e-12 if dtype == np.float64 else 1e-3)


@pytest.mark.parametrize("shape", [(6, 3), (4, 5), (2, 3, 4, 3), (3, 2, 5, 4)])
def test_batchnorm_train(shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    C = shape[-1]
    x = rng.standard_normal(shape) * 2 + 1
    check_kernel(norm.batchnorm_forward, norm.batchnorm_backward,
                 (x, rng.standard_normal(C), rng.standard_normal(C)), 1e-5, True)


def test_batchnorm_moments_and_eval():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 2, 3)) * 3 + 2
    _, cache = norm.batchnorm_forward(x, np.ones(3), np.zeros(3), 1e-5, True)
    x2 = x.reshape(-1, 3)
    np.testing.assert_allclose(cache.moments, np.concatenate(([24.0], x2.sum(0), (x2 ** 2).sum(0))), rtol=1e-12)
    rm, rv = np.zeros(3), np.ones(3)
    norm.running_stats_from_moments(cache.moments, rm, rv, 0.1)
    np.testing.assert_allclose(rm, 0.1 * x2.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x2.var(0, ddof=1), rtol=1e-12)
    out, _ = norm.batchnorm_forward(x, np.full(3, 2.0), np.full(3, 0.5), 1e-5, False, rm, rv)
    np.testing.assert_allclose(out, (x - rm) / np.sqrt(rv + 1e-5) * 2 + 0.5, rtol=1e-12)


def test_softmax_cross_entropy():
    rng = np.random.default_rng(6)
    logits, labels = rng.standard_normal((5, 4)) * 3, rng.integers(0, 4, 5)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, labels, denom=8)
    num = numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0] / 8, logits)
    assert rel_error(dlogits, num) < TOL
    ref = -(logits[np.arange(5), labels] - np.log(np.exp(logits).sum(1))).sum()
    assert abs(loss_sum - ref) < 1e-12 and correct == int((logits.argmax(1) == labels).sum())
    big, _, _ = softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, -1000.0]]), np.array([1, 1]))
    assert np.isfinite(big) and abs(big - 2000.0) < 1e-9  # stable: log-sum-exp, no overflow


@pytest.mark.parametrize("s", [0.1, 0.3])
def test_label_smoothed_cross_entropy(s):
    """Against finite differences (float64) and the definition -Σ_k q_k log p_k, q = (1 - s) onehot + s / K."""
    rng = np.random.default_rng(7)
    logits, labels = rng.standard_normal((6, 5)) * 3, rng.integers(0, 5, 6)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, labels, denom=9, smoothing=s)
    num = numeric_grad(lambda: softmax_cross_entropy(logits, labels, smoothing=s)[0] / 9, logits)
    assert rel_error(dlogits, num) < TOL
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    q = np.full((6, 5), s / 5)
    q[np.arange(6), labels] += 1 - s
    assert abs(loss_sum - float(-(q * logp).sum())) < 1e-12
    assert correct == int((logits.argmax(1) == labels).sum())
    assert np.abs(dlogits.sum(1)).max() < 1e-15  # softmax - q sums to 0 per row
    big, _, _ = softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, -1000.0]]), np.array([1, 1]), smoothing=s)
    assert np.isfinite(big)


TINY = ModelConfig(widths=[4, 8], res_width=8, hidden=16)
TINY_SHORTCUT = ModelConfig(widths=[4, 6], res_width=8, hidden=16)  # channel change: 1x1 conv + BN shortcut


def _tiny_model(mcfg):
    return small_model(mcfg, dtype=np.float64, jitter=0.1)


@pytest.mark.parametrize("mcfg", [TINY, TINY_SHORTCUT])
def test_model_gradient_vs_finite_differences(mcfg):
    model, store = _tiny_model(mcfg)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 16, 16, 3)), rng.integers(0, 5, 6)
    _, dlogits, _ = softmax_cross_entropy(model.forward(x, True), y)
    store.grads.fill(np.nan)  # backward must overwrite every entry
    model.backward(dlogits)
    assert np.isfinite(store.grads).all()
    f = lambda: softmax_cross_entropy(model.forward(x, True), y)[0] / len(y)
    # a few entries of every parameter tensor
    idx = [p.offset + int(i) for p in store.param_list for i in rng.choice(p.size, min(p.size, 3), replace=False)]
    num = numeric_grad(f, store.params, 1e-5, [(i,) for i in idx])[idx]
    assert rel_error(store.grads[idx], num) < TOL


def _threaded_allreduce(n: int):
    """A fake SUM all-reduce across n threads: every thread posts its array, all wait, all get the rank-ordered sum."""
    slots: list = [None] * n
    barrier = threading.Barrier(n, timeout=30)

    def make(rank):
        def allreduce(a):
            slots[rank] = a.copy()
            barrier.wait()
            total = sum(slots[1:], slots[0].copy())
            barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total
        return allreduce
    return make


def test_sync_batchnorm_shards_reproduce_full_batch():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((11, 16, 16, 3)), rng.integers(0, 5, 11)
    full, full_store = _tiny_model(TINY_SHORTCUT)
    _, dlogits, _ = softmax_cross_entropy(full.forward(x, True), y, denom=11)
    full.backward(dlogits)
    bounds = [0, 3, 7, 11]  # uneven shards: 3, 4, 4
    make = _threaded_allreduce(3)
    models = []
    for r in range(3):
        m, st = _tiny_model(TINY_SHORTCUT)
        np.testing.assert_array_equal(st.params, full_store.params)
        m.set_bn_allreduce(make(r))
        models.append(m)
    errors: list = []

    def work(r):
        try:
            xs, ys = x[bounds[r]:bounds[r + 1]], y[bounds[r]:bounds[r + 1]]
            _, d, _ = softmax_cross_entropy(models[r].forward(xs, True), ys, denom=11)
            models[r].backward(d)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    grad_sum = sum(m.store.grads for m in models)
    assert rel_error(grad_sum, full_store.grads) < 1e-8
    # per tensor too, so a small tensor cannot hide behind a big one (tiny: the bias before a BN has an
    # exactly-zero gradient, i.e. pure rounding noise)
    tiny = 1e-6 * np.abs(full_store.grads).max()
    for p in full_store.param_list:
        got = sum(m.store.grads[p.offset:p.offset + p.size] for m in models)
        assert rel_error(got, p.grad.ravel(), tiny) < 1e-8, p.name
    moments = sum(m.bn_moments() for m in models)
    np.testing.assert_allclose(moments, full.bn_moments(), rtol=1e-10, atol=1e-9)
    # without the all-reduce the shards would NOT match (so this test can fail)
    m, _ = _tiny_model(TINY_SHORTCUT)
    _, d, _ = softmax_cross_entropy(m.forward(x[:3], True), y[:3], denom=11)
    m.backward(d)
    assert rel_error(models[0].store.grads, m.store.grads) > 1e-3
