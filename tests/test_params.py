"""The flat ParamStore contract on the real model, against the store's own arrays: every Param/Buffer is a view into
its three flat arrays, backward writes gradients in place, and rebind() keeps layers pointing at the new arrays."""
from __future__ import annotations

import numpy as np
from helpers import small_model

from dptrain.config import ModelConfig
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore

SMALL = ModelConfig(widths=[4, 8], res_width=16, hidden=16)


def _step(model, seed=1, n=4, size=16, classes=5):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, size, size, 3)).astype(model.store.dtype), rng.integers(0, classes, n)
    _, d, _ = softmax_cross_entropy(model.forward(x, True), y)
    model.backward(d)


def test_default_model_size_and_names():
    store = ParamStore(np.float32)
    model = build_model(ModelConfig(), 62, 64, store)  # no rng: registered, not allocated
    assert store.params is None
    assert 9.3e6 < store.num_params < 9.5e6
    names = [p.name for p in store.param_list]
    assert names[:3] == ["block1.conv.w", "block1.bn.gamma", "block1.bn.beta"]
    assert "block1.conv.b" not in names and "classifier.b" in names and "hidden.fc.b" in names
    assert dict((p.name, p.shape) for p in store.param_list)["hidden.fc.w"] == (256 * 8 * 8, 512)
    assert len(model.bn_layers) == 7  # 3 blocks + res bn1, bn2, shortcut bn + hidden bn
    assert model.bn_moments_size == sum(1 + 2 * bn.C for bn in model.bn_layers)
    decay = {p.name: p.decay for p in store.param_list}
    assert decay["block1.conv.w"] and decay["hidden.fc.w"]
    assert not (decay["block1.bn.gamma"] or decay["block1.bn.beta"] or decay["classifier.b"])


def test_views_share_memory_with_store_after_backward():
    model, store = small_model(SMALL)
    params_before, grads_before = store.params, store.grads
    store.grads.fill(np.nan)
    _step(model)
    assert store.params is params_before and store.grads is grads_before
    assert np.isfinite(store.grads).all()  # every entry overwritten by one backward
    for p in store.param_list:
        assert np.shares_memory(p.data, store.params) and np.shares_memory(p.grad, store.grads), p.name
        np.testing.assert_array_equal(p.grad.ravel(), store.grads[p.offset:p.offset + p.size])
    for b in store.buffer_list:
        assert np.shares_memory(b.data, store.buffers), b.name


def test_backward_overwrites_and_tolerates_zeroed_grads():
    model, store = small_model(SMALL)
    _step(model)
    g1 = store.grads.copy()
    _step(model)  # grads not zeroed: same batch, same gradient (overwrite, not accumulate)
    np.testing.assert_array_equal(store.grads, g1)
    store.grads.fill(0)
    _step(model)
    np.testing.assert_array_equal(store.grads, g1)


def test_rebind_moves_layers_to_new_arrays():
    model, store = small_model(SMALL)
    _step(model)
    g1 = store.grads.copy()
    params, grads, buffers = (np.zeros_like(store.params), np.zeros_like(store.grads),
                              np.zeros_like(store.buffers))
    store.rebind(params, grads, buffers, copy=True)
    _step(model)
    np.testing.assert_array_equal(grads, g1)  # the layers wrote into the new gradient array
    params *= 0.5  # and read weights from the new parameter array
    _step(model)
    assert not np.array_equal(grads, g1)


def test_float64_store_runs_in_float64():
    model, store = small_model(SMALL, dtype=np.float64)
    _step(model)
    assert store.grads.dtype == np.float64 and np.isfinite(store.grads).all()
    rng = np.random.default_rng(2)
    assert model.forward(rng.standard_normal((2, 16, 16, 3)), False).dtype == np.float64


def test_running_stats_from_summed_moments():
    model, store = small_model(SMALL)
    _step(model, seed=1)
    m1 = model.bn_moments()
    _step(model, seed=2)
    m2 = model.bn_moments()
    before = store.buffers.copy()
    model.update_running_stats(m1 + m2, 0.1)
    bn = model.bn_layers[0]
    C, count = bn.C, m1[0] + m2[0]
    s = m1[1:1 + C] + m2[1:1 + C]
    np.testing.assert_allclose(bn.running_mean.data, 0.1 * s / count, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(store.buffers, before)
