"""The default CNN written in PyTorch (NCHW), for speed comparisons; torch is optional and imported on demand.

    from dptrain.torch_ref import require_torch, build_torch_model
    torch = require_torch()                       # SystemExit with a clear message when torch is not installed
    net = build_torch_model(cfg.model, num_classes, image_size)

Same layers, shapes and parameter count as dptrain.nn.model.build_model (tests/test_nn_torch.py holds the
weight-for-weight twin used to check gradients); PyTorch's own initialisation, which does not matter for timing.
"""
from __future__ import annotations

from .config import ModelConfig


def require_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("dptrain: --compare torch needs PyTorch (pip install torch, CPU wheel; "
                         "or pip install -e '.[oracle]')") from None
    return torch


def build_torch_model(mcfg: ModelConfig, num_classes: int, image_size: int, in_channels: int = 3):
    """nn.Sequential twin of build_model: conv-BN-ReLU-pool blocks, residual block, hidden Linear-BN-ReLU, classifier."""
    torch = require_torch()
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout, mcfg.bn_eps),
                                      nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout, mcfg.bn_eps))
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, mcfg.bn_eps))

        def forward(self, x):
            return torch.relu(self.main(x) + self.short(x))

    mods, c, size = [], in_channels, image_size
    for w in mcfg.widths:
        mods += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w, mcfg.bn_eps), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = w, size // 2
    if mcfg.res_width:
        mods.append(Residual(c, mcfg.res_width))
        c = mcfg.res_width
    mods.append(nn.Flatten())
    d = c * size * size
    if mcfg.hidden:
        mods += [nn.Linear(d, mcfg.hidden), nn.BatchNorm1d(mcfg.hidden, mcfg.bn_eps), nn.ReLU()]
        d = mcfg.hidden
    mods.append(nn.Linear(d, num_classes))
    return nn.Sequential(*mods).train()


def torch_sgd(net, tcfg):
    """torch.optim.SGD with the trainer's momentum and weight decay (decay on every tensor: the cost is the same)."""
    torch = require_torch()
    return torch.optim.SGD(net.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
