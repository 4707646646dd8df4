"""Every layer and the whole model against PyTorch autograd in float32: forward outputs, every gradient, and the
BN running statistics (max relative error < 1e-4, rel = max|a-b| / max(max|a|, max|b|)).

PyTorch is NCHW with conv weights (F, C, kh, kw) and Linear weights (out, in); we are NHWC with (kh, kw, C, F) and
(in, out), so weights are transposed on the way in and gradients on the way back. The torch model flattens in NHWC
order (permute before flatten) to match ours.
"""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import rel_error

from dptrain.config import ModelConfig
from dptrain.nn import layers as L
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore

torch = pytest.importorskip("torch")
nn = torch.nn
TOL = 1e-4


def t(a):
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)


def nchw(a):  # (N, H, W, C) -> (N, C, H, W)
    return t(np.asarray(a).transpose(0, 3, 1, 2))


def nhwc(x):  # torch (N, C, H, W) -> numpy (N, H, W, C)
    return x.detach().numpy().transpose(0, 2, 3, 1)


def conv_w_to_torch(w):  # (kh, kw, C, F) -> (F, C, kh, kw)
    return t(np.asarray(w).transpose(3, 2, 0, 1))


def conv_w_from_torch(g):  # (F, C, kh, kw) -> (kh, kw, C, F)
    return g.detach().numpy().transpose(2, 3, 1, 0)


def _run_layer(layer, store, x, torch_mod, to_torch_params, grads_from_torch, rng):
    """Forward + backward one layer in both frameworks with the same random dout; compare out, dx, param grads."""
    store.allocate(rng)
    store.params[...] += rng.normal(0, 0.1, store.num_params).astype(np.float32)
    to_torch_params()
    out = layer.forward(x, True).copy()
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(dout)
    is_img = x.ndim == 4
    xt = (nchw(x) if is_img else t(x)).requires_grad_(True)
    yt = torch_mod(xt)
    (yt * (nchw(dout) if is_img else t(dout))).sum().backward()
    assert rel_error(out, nhwc(yt) if is_img else yt.detach().numpy()) < TOL
    assert rel_error(dx, nhwc(xt.grad) if is_img else xt.grad.numpy()) < TOL
    for ours, theirs in grads_from_torch():
        assert rel_error(ours, theirs) < TOL


@pytest.mark.parametrize("k,stride,pad,shape", [(3, 1, 1, (4, 9, 7, 5)), (3, 2, 1, (3, 8, 8, 4)),
                                                (1, 2, 0, (3, 7, 6, 4)), (5, 1, 2, (2, 8, 9, 3))])
def test_conv2d(k, stride, pad, shape):
    rng = np.random.default_rng(k * 10 + stride)
    store = ParamStore(np.float32)
    C, Fo = shape[-1], 6
    layer = L.Conv2D(store, "c", C, Fo, k, stride, pad, bias=True)
    mod = nn.Conv2d(C, Fo, k, stride, pad)

    def load():
        with torch.no_grad():
            mod.weight.copy_(conv_w_to_torch(layer.w.data))
            mod.bias.copy_(t(layer.b.data))

    x = rng.standard_normal(shape).astype(np.float32)
    _run_layer(layer, store, x, mod, load, lambda: [(layer.w.grad, conv_w_from_torch(mod.weight.grad)),
                                                    (layer.b.grad, mod.bias.grad.numpy())], rng)


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 5, 3)])
def test_batchnorm(shape):
    rng = np.random.default_rng(1)
    store = ParamStore(np.float32)
    C = shape[-1]
    layer = (L.BatchNorm2D if len(shape) == 4 else L.BatchNorm1D)(store, "bn", C)
    mod = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(C, momentum=0.1)

    def load():
        with torch.no_grad():
            mod.weight.copy_(t(layer.gamma.data))
            mod.bias.copy_(t(layer.beta.data))

    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    _run_layer(layer, store, x, mod, load, lambda: [(layer.gamma.grad, mod.weight.grad.numpy()),
                                                    (layer.beta.grad, mod.bias.grad.numpy())], rng)
    layer.update_running_stats(layer.moments, 0.1)
    assert rel_error(layer.running_mean.data, mod.running_mean.numpy()) < TOL
    assert rel_error(layer.running_var.data, mod.running_var.numpy()) < TOL


@pytest.mark.parametrize("make", [lambda: (L.MaxPool2D(2), nn.MaxPool2d(2)), lambda: (L.AvgPool2D(2), nn.AvgPool2d(2)),
                                  lambda: (L.MaxPool2D(3, 2), nn.MaxPool2d(3, 2)), lambda: (L.ReLU(), nn.ReLU())])
@pytest.mark.parametrize("shape", [(3, 9, 8, 4), (3, 8, 6, 4)])  # odd / even: generic and fast 2x2 max-pool
def test_parameterless(make, shape):
    rng = np.random.default_rng(2)
    layer, mod = make()
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :2, :2, :] = 0  # a tied max-pool window and ReLU zeros: both pick the same element as torch
    x[1, :2, :2, :] = np.array([[1.0, 5.0], [5.0, 0.0]])[:, :, None] + 3  # tie across rows and columns
    _run_layer(layer, ParamStore(np.float32), x, mod, lambda: None, lambda: [], rng)


def test_linear():
    rng = np.random.default_rng(3)
    store = ParamStore(np.float32)
    layer, mod = L.Linear(store, "fc", 7, 5), nn.Linear(7, 5)

    def load():
        with torch.no_grad():
            mod.weight.copy_(t(layer.w.data.T))
            mod.bias.copy_(t(layer.b.data))

    x = rng.standard_normal((4, 7)).astype(np.float32)
    _run_layer(layer, store, x, mod, load, lambda: [(layer.w.grad, mod.weight.grad.numpy().T),
                                                    (layer.b.grad, mod.bias.grad.numpy())], rng)


class NHWCFlatten(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)  # NCHW -> NHWC order, like ours


class TorchResidual(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                      if cin != cout else nn.Identity())

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.short(x))


def torch_twin(mcfg: ModelConfig, num_classes: int, image_size: int, store: ParamStore):
    """The same network in PyTorch, plus {our param/buffer name: torch tensor} and a weight copier."""
    mods, names, c, size = [], {}, 3, image_size
    for i, w in enumerate(mcfg.widths, start=1):
        conv, bn = nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
        mods += [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
        names |= {f"block{i}.conv.w": conv.weight, f"block{i}.bn.gamma": bn.weight, f"block{i}.bn.beta": bn.bias,
                  f"block{i}.bn.running_mean": bn.running_mean, f"block{i}.bn.running_var": bn.running_var}
        c, size = w, size // 2
    if mcfg.res_width:
        res = TorchResidual(c, mcfg.res_width)
        mods.append(res)
        parts = [("conv1", res.conv1), ("bn1", res.bn1), ("conv2", res.conv2), ("bn2", res.bn2)]
        if c != mcfg.res_width:
            parts += [("short.conv", res.short[0]), ("short.bn", res.short[1])]
        for n, m in parts:
            if isinstance(m, nn.Conv2d):
                names[f"res.{n}.w"] = m.weight
            else:
                names |= {f"res.{n}.gamma": m.weight, f"res.{n}.beta": m.bias,
                          f"res.{n}.running_mean": m.running_mean, f"res.{n}.running_var": m.running_var}
        c = mcfg.res_width
    mods.append(NHWCFlatten())
    d = c * size * size
    if mcfg.hidden:
        fc, bn = nn.Linear(d, mcfg.hidden), nn.BatchNorm1d(mcfg.hidden)
        mods += [fc, bn, nn.ReLU()]
        names |= {"hidden.fc.w": fc.weight, "hidden.fc.b": fc.bias, "hidden.bn.gamma": bn.weight,
                  "hidden.bn.beta": bn.bias, "hidden.bn.running_mean": bn.running_mean,
                  "hidden.bn.running_var": bn.running_var}
        d = mcfg.hidden
    head = nn.Linear(d, num_classes)
    mods.append(head)
    names |= {"classifier.w": head.weight, "classifier.b": head.bias}
    net = nn.Sequential(*mods)
    ours = {p.name: p for p in store.param_list} | {b.name: b for b in store.buffer_list}
    assert set(ours) == set(names), set(ours) ^ set(names)

    def to_ours(name, a):  # torch layout -> our layout
        a = a.detach().numpy()
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a

    with torch.no_grad():
        for name, tp in names.items():
            a = ours[name].data
            tp.copy_(t(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a))
    return net, names, to_ours


@pytest.mark.parametrize("mcfg,size,classes", [(ModelConfig(widths=[4, 8], res_width=12, hidden=16), 16, 7),
                                               (ModelConfig(widths=[8], res_width=8, hidden=0), 8, 3),
                                               (ModelConfig(widths=[8, 16, 16], res_width=32, hidden=64), 32, 62)])
def test_model_vs_torch(mcfg, size, classes):
    rng = np.random.default_rng(4)
    store = ParamStore(np.float32)
    model = build_model(mcfg, classes, size, store, rng=rng)
    store.params[...] += rng.normal(0, 0.05, store.num_params).astype(np.float32)
    net, names, to_ours = torch_twin(mcfg, classes, size, store)
    N = 10
    x, y = rng.standard_normal((N, size, size, 3)).astype(np.float32), rng.integers(0, classes, N)
    logits = model.forward(x, True)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, y, denom=N)
    model.backward(dlogits)
    model.update_running_stats(model.bn_moments(), 0.1)
    net.train()
    lt = net(nchw(x))
    loss = nn.functional.cross_entropy(lt, torch.tensor(y))
    loss.backward()
    assert rel_error(logits, lt.detach().numpy()) < TOL
    assert abs(loss_sum / N - loss.item()) < 1e-4 * max(1.0, loss.item())
    ours = {p.name: p for p in store.param_list} | {b.name: b for b in store.buffer_list}
    for name, tp in names.items():
        if name in {p.name for p in store.param_list}:
            if name == "hidden.fc.b":  # bias before BN: the true gradient is 0, compare on the weight's scale
                assert np.abs(ours[name].grad - to_ours(name, tp.grad)).max() < TOL * np.abs(ours["hidden.fc.w"].grad).max()
                continue
            assert rel_error(ours[name].grad, to_ours(name, tp.grad)) < TOL, name
        else:
            assert rel_error(ours[name].data, to_ours(name, tp)) < TOL, name
    net.eval()
    with torch.no_grad():
        assert rel_error(model.forward(x, False), net(nchw(x)).numpy()) < TOL
