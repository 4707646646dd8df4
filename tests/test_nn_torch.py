"""Every layer and the whole model against PyTorch autograd: each layer in float64 over a loop of input shapes
(forward output, input gradient, every parameter gradient, BN running statistics; rel error < 1e-10), the model
(dptrain.nn.torch_ref's twin, loaded with our weights) in float32, the training dtype (rel error < 1e-4);
rel = max|a-b| / max(max|a|, max|b|).

PyTorch is NCHW; inputs and output gradients are transposed on the way in, outputs and input gradients on the way
back. Weights and their gradients go through torch_ref's layout helpers.
"""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import rel_error
from helpers import small_model

from dptrain.config import ModelConfig
from dptrain.nn import layers as L
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.params import ParamStore
from dptrain.nn.torch_ref import build_torch_model, from_torch_layout, load_weights, twin_tensors

torch = pytest.importorskip("torch")
nn = torch.nn


def to_torch(a: np.ndarray):
    """numpy (N, H, W, C) -> torch (N, C, H, W); (N, D) as it is."""
    a = np.asarray(a)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a))


def to_numpy(t) -> np.ndarray:
    """torch (N, C, H, W) -> numpy (N, H, W, C); (N, D) as it is."""
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def randn(rng, shape):
    return rng.standard_normal(shape) * 2 + 0.5


def check_layer(shapes, torch_layer, our_layer, make_x=randn, tol=1e-10):
    """For every input shape: torch_layer(C) and our_layer(store, "layer", C), C = shape[-1], get the same random
    float64 weights; both run forward in train mode on the same x = make_x(rng, shape) and backward from the same
    random dout. Compares out, dx, every parameter gradient and (BN layers) the updated running statistics."""
    for i, shape in enumerate(shapes):
        rng = np.random.default_rng(i)
        store = ParamStore(np.float64)
        ours, theirs = our_layer(store, "layer", shape[-1]), torch_layer(shape[-1]).double()
        twin = nn.ModuleDict({"layer": theirs})  # tensor names layer.weight etc., like ours: layer.w
        store.allocate(rng)
        store.params[...] += rng.normal(0, 0.1, store.num_params)  # BN gamma != 1, beta != 0
        load_weights(twin, store)
        x = make_x(rng, shape)
        out = ours.forward(x, True).copy()
        dout = rng.standard_normal(out.shape)
        dx = ours.backward(dout)
        xt = to_torch(x).requires_grad_(True)
        yt = theirs(xt)
        (yt * to_torch(dout)).sum().backward()
        assert rel_error(out, to_numpy(yt)) < tol, shape
        assert rel_error(dx, to_numpy(xt.grad)) < tol, shape
        if isinstance(ours, L.BatchNorm):
            ours.update_running_stats(ours.moments, theirs.momentum)
        twins = twin_tensors(twin, store)
        for p in store.param_list:
            assert rel_error(p.grad, from_torch_layout(twins[p.name].grad)) < tol, (shape, p.name)
        for b in store.buffer_list:
            assert rel_error(b.data, from_torch_layout(twins[b.name])) < tol, (shape, b.name)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 1, 2), (1, 1, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(k, stride, pad, bias):
    check_layer([(4, 9, 7, 5), (3, 8, 8, 4), (2, 6, 5, 1)], lambda C: nn.Conv2d(C, 6, k, stride, pad, bias=bias),
                lambda store, name, C: L.Conv2D(store, name, C, 6, k, stride, pad, bias=bias))


@pytest.mark.parametrize("torch_bn,our_bn,shapes", [(nn.BatchNorm1d, L.BatchNorm1D, [(6, 5), (16, 3), (2, 7)]),
                                                    (nn.BatchNorm2d, L.BatchNorm2D, [(4, 6, 5, 3), (2, 3, 4, 8)])])
def test_batchnorm(torch_bn, our_bn, shapes):
    check_layer(shapes, torch_bn, our_bn)


def with_ties(rng, shape):
    """Random x with a tied max-pool window and ReLU zeros in image 0, a tie across rows and columns in image 1:
    both implementations must route the gradient to the same element."""
    x = rng.standard_normal(shape)
    x[0, :2, :2, :] = 0
    x[1, :2, :2, :] = np.array([[1.0, 5.0], [5.0, 0.0]])[:, :, None] + 3
    return x


@pytest.mark.parametrize("torch_layer,our_layer", [(nn.MaxPool2d(2), L.MaxPool2D(2)), (nn.AvgPool2d(2), L.AvgPool2D(2)),
                                                   (nn.MaxPool2d(3, 2), L.MaxPool2D(3, 2)), (nn.ReLU(), L.ReLU())])
def test_parameterless(torch_layer, our_layer):
    # odd and even sizes: the generic and the fast 2x2 max-pool
    check_layer([(3, 9, 8, 4), (3, 8, 6, 4), (2, 4, 4, 1)], lambda C: torch_layer, lambda *_: our_layer, with_ties)


def test_linear():
    check_layer([(4, 7), (1, 3), (9, 16)], lambda C: nn.Linear(C, 5),
                lambda store, name, C: L.Linear(store, name, in_features=C, out_features=5))


def test_label_smoothing_vs_torch():
    """The float32 loss and dlogits against nn.functional.cross_entropy(label_smoothing=0.1), autograd's gradient."""
    rng = np.random.default_rng(3)
    logits, y = (rng.standard_normal((12, 62)) * 4).astype(np.float32), rng.integers(0, 62, 12)
    loss_sum, dlogits, _ = softmax_cross_entropy(logits, y, denom=12, smoothing=0.1)
    lt = torch.tensor(logits, requires_grad=True)
    loss = nn.functional.cross_entropy(lt, torch.tensor(y), label_smoothing=0.1)
    loss.backward()
    assert abs(loss_sum / 12 - loss.item()) < 1e-5 * loss.item()
    assert rel_error(dlogits, lt.grad.numpy()) < 1e-5


@pytest.mark.parametrize("mcfg,size,classes", [(ModelConfig(widths=[4, 8], res_width=12, hidden=16), 16, 7),
                                               (ModelConfig(widths=[8], res_width=8, hidden=0), 8, 3),
                                               (ModelConfig(widths=[8, 16, 16], res_width=32, hidden=64), 32, 62)])
def test_model_vs_torch(mcfg, size, classes):
    tol = 1e-4
    model, store = small_model(mcfg, classes, size, seed=4, jitter=0.05)
    net = build_torch_model(mcfg, classes, size)
    load_weights(net, store)
    rng = np.random.default_rng(4)
    N = 10
    x, y = rng.standard_normal((N, size, size, 3)).astype(np.float32), rng.integers(0, classes, N)
    logits = model.forward(x, True)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, y, denom=N)
    model.backward(dlogits)
    model.update_running_stats(model.bn_moments(), mcfg.bn_momentum)
    lt = net(to_torch(x))
    loss = nn.functional.cross_entropy(lt, torch.tensor(y))
    loss.backward()
    assert rel_error(logits, lt.detach().numpy()) < tol
    assert abs(loss_sum / N - loss.item()) < 1e-4 * max(1.0, loss.item())
    twins = twin_tensors(net, store)
    for p in store.param_list:
        theirs = from_torch_layout(twins[p.name].grad)
        if p.name == "hidden.fc.b":  # bias before BN: the true gradient is 0, compare on the weight's scale
            assert np.abs(p.grad - theirs).max() < tol * np.abs(twins["hidden.fc.w"].grad.numpy()).max()
        else:
            assert rel_error(p.grad, theirs) < tol, p.name
    for b in store.buffer_list:
        assert rel_error(b.data, from_torch_layout(twins[b.name])) < tol, b.name
    net.eval()
    with torch.no_grad():
        assert rel_error(model.forward(x, False), net(to_torch(x)).numpy()) < tol
