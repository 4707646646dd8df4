"""Thin layer classes over the kernels: they register their tensors on a ParamStore, keep the forward cache and
write gradients in place into their `Param.grad` views (`p.grad[...] = ...`, never rebinding), so a whole
backward pass fills `store.grads` (see params.py). Every backward fully overwrites its layer's gradients.

Layout is NHWC; conv weights (kh, kw, C, F); Linear weights (in, out); see functional.py.
Every layer: `forward(x, train) -> out`, `backward(dout) -> dx` (None when `need_dx` is False, which the model
sets on its first layer). Outputs live in per-layer scratch buffers reused on the next call (see Workspace).
"""
from __future__ import annotations

import numpy as np

from . import conv, functional as F, norm, normpool, pool
from .params import ParamStore, he_normal, ones, uniform_fan_in, zeros
from .workspace import Workspace


class Layer:
    need_dx = True

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def children(self) -> list[Layer]:
        return []


class Conv2D(Layer):
    """k x k convolution, NHWC. Params: `{name}.w` (k, k, cin, cout); `{name}.b` (cout,) if bias. init="he":
    He-normal weights, zero bias; "pytorch": PyTorch's default, U(+-1/sqrt(fan_in)) for both (fan_in = k*k*cin).
    algo: "im2col" | "winograd" | "auto" (conv.choose_algo: by the layer's shape)."""

    def __init__(self, store: ParamStore, name: str, cin: int, cout: int, k: int = 3, stride: int = 1,
                 pad: int = 0, bias: bool = True, init: str = "he", algo: str = "im2col"):
        self.stride, self.pad, self.algo = stride, pad, algo
        fan_in = k * k * cin
        self.w = store.param(f"{name}.w", (k, k, cin, cout),
                             he_normal(fan_in) if init == "he" else uniform_fan_in(fan_in), decay=True)
        self.b = store.param(f"{name}.b", (cout,), zeros if init == "he" else uniform_fan_in(fan_in),
                             decay=False) if bias else None
        self.ws = Workspace()
        self.cache: conv.ConvCache | conv.WinoCache | None = None

    def forward(self, x, train):
        out, self.cache = conv.conv2d_forward(x, self.w.data, None if self.b is None else self.b.data,
                                              self.stride, self.pad, self.ws, algo=self.algo)
        return out

    def backward(self, dout):
        dx, _, _ = conv.conv2d_backward(dout, self.cache, self.need_dx, self.ws, dw_out=self.w.grad,
                                        db_out=None if self.b is None else self.b.grad)
        return dx


class BatchNorm(Layer):
    """Params `{name}.gamma` (ones; zeros with zero_gamma), `{name}.beta` (zeros), both decay=False; buffers
    `{name}.running_mean` (0) and `{name}.running_var` (1). After a train-mode forward, `moments` holds this step's
    local float64 `[count, sum, sumsq]`. `allreduce`: the SyncBatchNorm hook (see norm.py); None = ordinary BN."""

    def __init__(self, store: ParamStore, name: str, C: int, eps: float = 1e-5, zero_gamma: bool = False):
        self.name, self.C, self.eps = name, C, eps
        self.gamma = store.param(f"{name}.gamma", (C,), zeros if zero_gamma else ones, decay=False)
        self.beta = store.param(f"{name}.beta", (C,), zeros, decay=False)
        self.running_mean = store.buffer(f"{name}.running_mean", (C,), 0.0)
        self.running_var = store.buffer(f"{name}.running_var", (C,), 1.0)
        self.allreduce: norm.AllReduce | None = None
        self.moments: np.ndarray | None = None
        self.ws = Workspace()
        self.cache: norm.BNCache | None = None

    @property
    def moments_size(self) -> int:
        return 1 + 2 * self.C

    def forward(self, x, train):
        out, self.cache = norm.batchnorm_forward(x, self.gamma.data, self.beta.data, self.eps, train,
                                                 self.running_mean.data, self.running_var.data,
                                                 self.allreduce if train else None, self.ws)
        if train:
            self.moments = self.cache.moments
        return out

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self.name}: backward needs a train-mode forward")
        dx, dgamma, dbeta = norm.batchnorm_backward(dout, self.cache, self.ws)
        self.gamma.grad[...] = dgamma
        self.beta.grad[...] = dbeta
        return dx

    def update_running_stats(self, moments: np.ndarray, momentum: float) -> None:
        norm.running_stats_from_moments(moments, self.running_mean.data, self.running_var.data, momentum)


class BatchNorm2D(BatchNorm):
    """BatchNorm over (N, H, W, C): statistics over N*H*W per channel."""


class BatchNorm1D(BatchNorm):
    """BatchNorm over (N, C): statistics over N per feature."""


class ReLU(Layer):
    def __init__(self):
        self.ws = Workspace()
        self.cache: F.ReluCache | None = None

    def forward(self, x, train):
        out, self.cache = F.relu_forward(x, self.ws)
        return out

    def backward(self, dout):
        return F.relu_backward(dout, self.cache, self.ws)


class MaxPool2D(Layer):
    def __init__(self, k: int = 2, stride: int | None = None):
        self.k, self.stride = k, stride or k
        self.ws = Workspace()
        self.cache: pool.MaxPoolCache | pool.MaxPool2x2Cache | pool.AvgPoolCache | None = None

    def forward(self, x, train):
        out, self.cache = pool.maxpool2d_forward(x, self.k, self.stride, self.ws)
        return out

    def backward(self, dout):
        return pool.maxpool2d_backward(dout, self.cache, self.ws)


class AvgPool2D(MaxPool2D):
    def forward(self, x, train):
        out, self.cache = pool.avgpool2d_forward(x, self.k, self.stride, self.ws)
        return out

    def backward(self, dout):
        return pool.avgpool2d_backward(dout, self.cache, self.ws)


class BNPoolReLU(Layer):
    """BatchNorm2D -> max-pool k (stride s) -> ReLU, computed as max-pool -> BN affine -> ReLU (normpool.py): the
    same output bit for bit, BN's normalisation on the pooled quarter. `bn` is the BatchNorm2D whose tensors and
    moments it uses (the model's BN plumbing, checkpoints and exports see an ordinary BatchNorm2D)."""

    def __init__(self, bn: BatchNorm2D, k: int = 2, stride: int | None = None):
        self.bn, self.k, self.stride = bn, k, stride or k
        self.ws = Workspace()
        self.cache: normpool.BNPoolCache | None = None

    def children(self):
        return [self.bn]

    def forward(self, x, train):
        bn = self.bn
        out, self.cache = normpool.bn_pool_relu_forward(x, bn.gamma.data, bn.beta.data, bn.eps, train,
                                                        bn.running_mean.data, bn.running_var.data,
                                                        bn.allreduce if train else None, self.k, self.stride, self.ws)
        if train:
            bn.moments = self.cache.moments
        return out

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self.bn.name}: backward needs a train-mode forward")
        dx, dgamma, dbeta = normpool.bn_pool_relu_backward(dout, self.cache, self.ws)
        self.bn.gamma.grad[...] = dgamma
        self.bn.beta.grad[...] = dbeta
        return dx


class Linear(Layer):
    """x (N, in_features) @ w + b. Params `{name}.w` (in_features, out_features), `{name}.b` (out_features,)
    (decay=False). init="he" (He-normal, zero bias, for a hidden layer followed by ReLU) or "uniform" / "pytorch"
    (PyTorch's default, U(+-1/sqrt(in_features)) weights and bias)."""

    def __init__(self, store: ParamStore, name: str, in_features: int, out_features: int, bias: bool = True,
                 init: str = "he"):
        winit = he_normal(in_features) if init == "he" else uniform_fan_in(in_features)
        self.w = store.param(f"{name}.w", (in_features, out_features), winit, decay=True)
        self.b = store.param(f"{name}.b", (out_features,), zeros if init == "he" else uniform_fan_in(in_features),
                             decay=False) if bias else None
        self.cache: F.LinearCache | None = None
        # factored: backward leaves (x, dout) in `factors` instead of computing the weight gradient x.T @ dout (whoever
        # gathers the factors of every shard computes it once over the whole batch: the mesh's owners, or the one-host
        # reduction, distributed/reduce.py)
        self.factored = False
        self.factors: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, x, train):
        out, self.cache = F.linear_forward(x, self.w.data, None if self.b is None else self.b.data)
        return out

    def backward(self, dout):
        if self.factored:
            if self.b is not None:
                self.b.grad[...] = F.colsum(dout)
            self.factors = (self.cache.x, dout)
            return F.linear_dx(dout, self.cache.w) if self.need_dx else None
        dx, _, _ = F.linear_backward(dout, self.cache, self.need_dx, dw_out=self.w.grad,
                                     db_out=None if self.b is None else self.b.grad)
        return dx


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C) in NHWC order."""

    def __init__(self):
        self.cache: F.FlattenCache | None = None

    def forward(self, x, train):
        out, self.cache = F.flatten_forward(x)
        return out

    def backward(self, dout):
        return F.flatten_backward(dout, self.cache)


class Sequential(Layer):
    def __init__(self, layers: list[Layer]):
        self.layers = list(layers)

    def children(self):
        return self.layers

    @property
    def need_dx(self):  # the first layer decides whether an input gradient is produced
        return self.layers[0].need_dx if self.layers else True

    @need_dx.setter
    def need_dx(self, value):
        if self.layers:
            self.layers[0].need_dx = value

    def forward(self, x, train):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout


class ResidualBlock(Layer):
    """out = ReLU(BN(conv3x3(ReLU(BN(conv3x3_s(x))))) + shortcut(x)); shortcut = BN(conv1x1_s(x)) when the
    channels or the stride change, else identity. Convs have no bias (BN follows). Names: `{name}.conv1`,
    `{name}.bn1`, `{name}.conv2`, `{name}.bn2`, `{name}.short.conv`, `{name}.short.bn`. algo: the 3x3 convs' (Conv2D).
    zero_init: bn2's gamma starts at 0, so the block starts as its shortcut (Goyal et al. 2017,
    "zero-init-residual")."""

    def __init__(self, store: ParamStore, name: str, cin: int, cout: int, stride: int = 1, eps: float = 1e-5,
                 init: str = "he", algo: str = "im2col", zero_init: bool = False):
        self.main = Sequential([
            Conv2D(store, f"{name}.conv1", cin, cout, 3, stride, 1, bias=False, init=init, algo=algo),
            BatchNorm2D(store, f"{name}.bn1", cout, eps), ReLU(),
            Conv2D(store, f"{name}.conv2", cout, cout, 3, 1, 1, bias=False, init=init, algo=algo),
            BatchNorm2D(store, f"{name}.bn2", cout, eps, zero_gamma=zero_init)])
        self.short = None
        if cin != cout or stride != 1:
            self.short = Sequential([Conv2D(store, f"{name}.short.conv", cin, cout, 1, stride, 0, bias=False,
                                            init=init),
                                     BatchNorm2D(store, f"{name}.short.bn", cout, eps)])
        self.relu = ReLU()
        self.ws = Workspace()

    def children(self):
        return [self.main] + ([self.short] if self.short else []) + [self.relu]

    def forward(self, x, train):
        y = self.main.forward(x, train)
        s = x if self.short is None else self.short.forward(x, train)
        z = self.ws.get("sum", y.shape, y.dtype)
        np.add(y, s, out=z)
        return self.relu.forward(z, train)

    def backward(self, dout):
        d = self.relu.backward(dout)
        self.main.need_dx = self.need_dx
        dmain = self.main.backward(d)
        if self.short is not None:
            self.short.need_dx = self.need_dx
            dshort = self.short.backward(d)
        else:
            dshort = d
        if not self.need_dx:
            return None
        dx = self.ws.get("dx", dmain.shape, dmain.dtype)
        np.add(dmain, dshort, out=dx)
        return dx


def walk(layer: Layer):
    """Every layer in forward (registration) order, depth first."""
    yield layer
    for child in layer.children():
        yield from walk(child)
