"""build_model computes each conv block as BN - maxpool - ReLU instead of BN - ReLU - maxpool: the same network bit
for bit (max and ReLU commute, and the gradient reaches the same element, ties included), only cheaper."""
from __future__ import annotations

import numpy as np
from helpers import make_config

from dptrain.nn.layers import MaxPool2D, ReLU
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore


def _model(swap: bool):
    cfg = make_config({"model.widths": [8, 16], "model.res_width": 16, "model.hidden": 32})
    store = ParamStore(np.float32)
    model = build_model(cfg.model, 5, 16, store, rng=np.random.default_rng(0))
    layers = model.net.layers
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, MaxPool2D)]
    assert pools and all(isinstance(layers[i + 1], ReLU) for i in pools)  # pool, then ReLU
    if swap:  # the textbook order: ReLU, then pool
        for i in pools:
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return model, store


def test_pool_then_relu_is_relu_then_pool_bitwise():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 16, 16, 3)).astype(np.float32)
    x[:, ::2, ::2] = x[:, 1::2, 1::2]  # ties inside pooling windows
    x[0] = 0.0  # a constant image: after BN every value of a channel is equal, every window a tie
    y = rng.integers(0, 5, 6)
    out = []
    for swap in (False, True):
        model, store = _model(swap)
        logits = model.forward(x, train=True)
        _, dlogits, _ = softmax_cross_entropy(logits, y, denom=6)
        model.backward(dlogits)
        out.append((logits.copy(), store.grads.copy(), model.bn_moments()))
    for a, b in zip(*out):
        assert np.array_equal(a, b)
