"""build_model computes each conv block's BN2D - ReLU - maxpool as max-pool - BN affine - ReLU (layers.BNPoolReLU,
normpool.py): the same outputs and BN moments bit for bit, the same gradients up to rounding, in train and eval mode,
with ties in the pooling windows, negative gammas (min-pooling channels) and SyncBatchNorm's all-reduce."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_config

from dptrain.nn import norm, normpool
from dptrain.nn.functional import relu_backward, relu_forward
from dptrain.nn.layers import BNPoolReLU, MaxPool2D, ReLU
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore
from dptrain.nn.pool import maxpool2d_backward, maxpool2d_forward

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2


def _model(textbook: bool):
    cfg = make_config({"model.widths": [8, 16], "model.res_width": 16, "model.hidden": 32})
    store = ParamStore(np.float32)
    model = build_model(cfg.model, 5, 16, store, rng=np.random.default_rng(0))
    layers = model.net.layers
    fused = [i for i, layer in enumerate(layers) if isinstance(layer, BNPoolReLU)]
    assert len(fused) == 2
    if textbook:  # BN, ReLU, then max-pool, as three layers
        for i in reversed(fused):
            layers[i:i + 1] = [layers[i].bn, ReLU(), MaxPool2D(2)]
    bn1, bn2 = model.bn_layers[:2]  # block1.bn, block2.bn
    bn1.gamma.data[::3] *= -0.5  # a third of the channels min-pool
    bn2.beta.data[...] += 0.3
    return model, store


def test_fused_model_matches_the_textbook_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 16, 16, 3)).astype(np.float32)
    x[:, ::2, ::2] = x[:, 1::2, 1::2]  # ties inside pooling windows
    x[0] = 0.0  # a constant image: every conv output of it is 0, every window a tie
    y = rng.integers(0, 5, 6)
    out = []
    for textbook in (False, True):
        model, store = _model(textbook)
        logits = model.forward(x, train=True)
        _, dlogits, _ = softmax_cross_entropy(logits, y, denom=6)
        model.backward(dlogits)
        moments = model.bn_moments()
        model.update_running_stats(moments, 0.5)
        out.append((logits.copy(), moments, store.grads.copy(), model.forward(x, train=False).copy()))
    (lf, mf, gf, ef), (lt, mt, gt, et) = out
    assert np.array_equal(lf, lt) and np.array_equal(mf, mt) and np.array_equal(ef, et)
    assert np.abs(gf - gt).max() <= 1e-5 * np.abs(gt).max()


def _textbook(x, gamma, beta, allreduce, dout):
    y, bc = norm.batchnorm_forward(x, gamma, beta, 1e-5, True, allreduce=allreduce)
    r, rc = relu_forward(y)
    p, pc = maxpool2d_forward(r, 2, 2)
    dx, dg, db = norm.batchnorm_backward(relu_backward(maxpool2d_backward(dout, pc), rc), bc)
    return p, dx, dg, db, bc.moments


@pytest.mark.parametrize("dtype,shape", [(np.float64, (3, 6, 4, 5)), (np.float32, (4, 8, 8, 16)),
                                         (np.float32, (2, 7, 9, 3))])  # odd sizes: the generic pool path
@pytest.mark.parametrize("sync", [False, True])
def test_kernel_matches_bn_relu_pool(dtype, shape, sync):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 2 + 0.7).astype(dtype)
    C = shape[-1]
    gamma = rng.uniform(0.3, 1.5, C).astype(dtype) * np.where(np.arange(C) % 2, -1, 1).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    dout = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, C)).astype(dtype)
    allreduce = (lambda a: 2.0 * a) if sync else None  # two identical shards
    p, dx, dg, db, moments = _textbook(x, gamma, beta, allreduce, dout)
    out, cache = normpool.bn_pool_relu_forward(x, gamma, beta, 1e-5, True, None, None, allreduce)
    fdx, fdg, fdb = normpool.bn_pool_relu_backward(dout, cache)
    assert np.array_equal(out, p) and np.array_equal(cache.moments, moments)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for a, b in ((fdx, dx), (fdg, dg), (fdb, db)):
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())
    # eval mode: the running statistics' affine, bit for bit
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    y, _ = norm.batchnorm_forward(x, gamma, beta, 1e-5, False, rm, rv)
    ref, _ = maxpool2d_forward(np.maximum(y, 0), 2, 2)
    ev, none = normpool.bn_pool_relu_forward(x, gamma, beta, 1e-5, False, rm, rv)
    assert none is None and np.array_equal(ev, ref)
