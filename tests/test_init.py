"""model.init = "pytorch" reproduces PyTorch's default initialisation tensor for tensor: every conv/Linear weight
and bias drawn from U(+-1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)), BN weight 1 and bias 0, running mean 0
and variance 1. Checked against the twin network torch builds with its own defaults (dptrain.nn.torch_ref): the same
bound (max |w| close to it, never above), the same standard deviation (bound / sqrt(3)) and mean near 0."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import small_model

from dptrain.config import ModelConfig
from dptrain.nn.torch_ref import build_torch_model, from_torch_layout, twin_tensors

torch = pytest.importorskip("torch")

MCFG = dict(widths=[8, 16], res_width=32, hidden=64)


def test_pytorch_init_matches_torch_defaults():
    model, store = small_model(ModelConfig(**MCFG, init="pytorch"), classes=10, size=16, seed=3)
    torch.manual_seed(3)
    net = build_torch_model(ModelConfig(**MCFG), 10, 16)
    data = {x.name: x.data for x in store.param_list + store.buffer_list}
    checked = 0
    for name, t in twin_tensors(net, store).items():
        ours, theirs = data[name], from_torch_layout(t)
        assert ours.shape == theirs.shape, name
        if not name.endswith((".w", ".b")):  # BN: gamma 1, beta 0, running mean 0 and var 1 on both sides
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
            continue
        w = data[name[:-2] + ".w"]  # (k, k, C, F) or (in, out): fan_in = all but the last axis
        bound = 1 / np.sqrt(w.size // w.shape[-1])
        assert np.abs(theirs).max() <= bound and np.abs(ours).max() <= bound, name
        if ours.size >= 64:
            assert np.abs(ours).max() >= 0.9 * bound and np.abs(theirs).max() >= 0.9 * bound, name
            assert ours.std() == pytest.approx(theirs.std(), rel=0.15), name
            assert ours.std() == pytest.approx(bound / np.sqrt(3), rel=0.15), name
            assert abs(ours.mean()) < 0.1 * bound, name
        checked += 1
    assert checked == 9  # 5 convs, the hidden Linear's weight and bias, the classifier's


def test_pytorch_init_is_the_default_and_he_differs():
    assert ModelConfig().init == "pytorch"
    _, he = small_model(ModelConfig(**MCFG, init="he"), classes=10, size=16, seed=3)
    _, pt = small_model(ModelConfig(**MCFG), classes=10, size=16, seed=3)
    w_he = next(p.data for p in he.param_list if p.name == "block1.conv.w")
    w_pt = next(p.data for p in pt.param_list if p.name == "block1.conv.w")
    fan_in = 3 * 3 * 3
    assert w_he.std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.15)
    assert w_pt.std() == pytest.approx(1 / np.sqrt(3 * fan_in), rel=0.15)
    assert np.abs(w_pt).max() <= 1 / np.sqrt(fan_in)
