"""The model of dptrain.nn.model.build_model written in PyTorch, tensor for tensor; torch is imported on demand.

    from dptrain.nn.torch_ref import build_torch_model, load_weights, twin_tensors
    net = build_torch_model(cfg.model, num_classes, image_size)   # input NCHW, like every torch CNN
    load_weights(net, store)                                      # our ParamStore's weights and BN statistics
    grads = {name: from_torch_layout(t.grad) for name, t in twin_tensors(net, store).items() if t.grad is not None}

Its modules are named like our layers, so every tensor of ours has one twin: `block1.conv.w` is
`block1.conv.weight`, `{bn}.gamma` / `{bn}.beta` are `{bn}.weight` / `{bn}.bias`. Layouts differ only by a
transpose: conv weights are (F, C, kh, kw) there and (kh, kw, C, F) here, Linear weights (out, in) there and (in, out)
here. The Flatten permutes NCHW to NHWC first, so the flat features come in our order and the first Linear's rows
need no permutation. The benchmarks (bench/local.py, bench/ddp.py) time this network with PyTorch's own initialisation.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import install_hint
from ..config import ModelConfig
from .params import ParamStore

_SUFFIX = {"w": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}


def require_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(f"dptrain: --compare torch needs PyTorch ({install_hint('oracle')})") from None
    return torch


def build_torch_model(mcfg: ModelConfig, num_classes: int, image_size: int, in_channels: int = 3):
    """nn.Sequential twin of build_model, in train mode: conv-BN-ReLU-pool blocks `block{i}`, residual block `res`,
    NHWC flatten, hidden Linear-BN-ReLU `hidden`, `classifier`."""
    torch = require_torch()
    nn = torch.nn

    def bn2d(c):
        return nn.BatchNorm2d(c, mcfg.bn_eps, mcfg.bn_momentum)

    class Residual(nn.Module):  # dptrain.nn.layers.ResidualBlock with stride 1
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), bn2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn2d(cout)
            self.short = (nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1, bias=False), bn=bn2d(cout)))
                          if cin != cout else nn.Identity())

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + self.short(x))

    class FlattenNHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)  # (N, C, H, W) -> (N, H*W*C), index ((h * W) + w) * C + c

    mods, c, size = OrderedDict(), in_channels, image_size
    for i, width in enumerate(mcfg.widths, start=1):
        mods[f"block{i}"] = nn.Sequential(OrderedDict(conv=nn.Conv2d(c, width, 3, 1, 1, bias=False), bn=bn2d(width),
                                                      relu=nn.ReLU(), pool=nn.MaxPool2d(2)))
        c, size = width, size // 2
    if mcfg.res_width:
        mods["res"] = Residual(c, mcfg.res_width)
        c = mcfg.res_width
    mods["flatten"] = FlattenNHWC()
    d = c * size * size
    if mcfg.hidden:
        mods["hidden"] = nn.Sequential(OrderedDict(fc=nn.Linear(d, mcfg.hidden),
                                                   bn=nn.BatchNorm1d(mcfg.hidden, mcfg.bn_eps, mcfg.bn_momentum),
                                                   relu=nn.ReLU()))
        d = mcfg.hidden
    mods["classifier"] = nn.Linear(d, num_classes)
    return nn.Sequential(mods).train()


def torch_name(name: str) -> str:
    """Our tensor name -> its twin's: `hidden.fc.w` -> `hidden.fc.weight`, `res.bn1.gamma` -> `res.bn1.weight`."""
    prefix, _, last = name.rpartition(".")
    return f"{prefix}.{_SUFFIX.get(last, last)}"


def to_torch_layout(a: np.ndarray) -> np.ndarray:
    """Conv (kh, kw, C, F) -> (F, C, kh, kw); Linear (in, out) -> (out, in); vectors unchanged."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def from_torch_layout(t) -> np.ndarray:
    """A torch tensor in its layout -> a numpy array in ours (the inverse of to_torch_layout)."""
    a = t.detach().numpy()
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def twin_tensors(net, store: ParamStore) -> dict:
    """{our name: the torch parameter or BN buffer} for every tensor of `store`, in registration order.
    ValueError unless the two networks hold the same set of tensors (BN's num_batches_tracked aside)."""
    theirs = dict(net.named_parameters()) | {k: v for k, v in net.named_buffers()
                                            if not k.endswith("num_batches_tracked")}
    names = [t.name for t in store.param_list + store.buffer_list]
    if {torch_name(n) for n in names} != set(theirs):
        raise ValueError(f"not twins: {sorted({torch_name(n) for n in names} ^ set(theirs))}")
    return {n: theirs[torch_name(n)] for n in names}


def load_weights(net, store: ParamStore) -> None:
    """Copy every parameter and BN running statistic of `store` into its twin tensor of `net` (dtype cast)."""
    torch = require_torch()
    data = {t.name: t.data for t in store.param_list + store.buffer_list}
    with torch.no_grad():
        for name, t in twin_tensors(net, store).items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(to_torch_layout(data[name]))))


def torch_sgd(net, tcfg):
    """torch.optim.SGD with the trainer's momentum and weight decay (decay on every tensor: the cost is the same)."""
    torch = require_torch()
    return torch.optim.SGD(net.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
