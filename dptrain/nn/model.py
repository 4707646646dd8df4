"""The LFW CNN and the Model wrapper the training loop, workers and coordinator use.

Architecture (NHWC, see functional.py), for widths [w1, w2, ...]:
  [conv3x3(pad 1, no bias) - BN2D - ReLU - maxpool 2x2] per width      names block{i}.conv / block{i}.bn
    computed as maxpool - BN affine - ReLU (layers.BNPoolReLU, normpool.py): max commutes with ReLU and with BN's
    monotonic per-channel affine, so the output is the same bit for bit, with the normalisation and ReLU on a
    quarter of the data (BN's moments still over all of it)
  ResidualBlock(prev -> res_width) if res_width, no pooling after it    names res.*
  Flatten (NHWC order)
  Linear(hidden) - BN1D - ReLU if hidden                                names hidden.fc / hidden.bn
  Linear(num_classes)                                                   name  classifier
Initialisation (model.init): "he" = He-normal conv/hidden weights, zero biases, PyTorch's uniform for the classifier;
"pytorch" = PyTorch's defaults everywhere. BN: gamma 1, beta 0 either way.
With the defaults (widths [32, 64, 128], res 256, hidden 512), 64x64 RGB and 62 classes: ~9.4M parameters.

Usage:
    store = ParamStore(np.float32)
    model = build_model(cfg.model, num_classes, image_size, store, rng=np.random.default_rng(seed))
    logits = model.forward(x, train=True)          # x: (N, H, W, C)
    loss_sum, dlogits, correct = softmax_cross_entropy(logits, y, denom=global_batch)
    model.backward(dlogits)                        # fills store.grads (every entry overwritten)
    moments = model.bn_moments()                   # local BN moments; sum over workers, then:
    model.update_running_stats(moments_sum, cfg.model.bn_momentum)
"""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from .layers import (
    BatchNorm,
    BatchNorm1D,
    BatchNorm2D,
    BNPoolReLU,
    Conv2D,
    Flatten,
    Layer,
    Linear,
    ReLU,
    ResidualBlock,
    Sequential,
    walk,
)
from .norm import AllReduce
from .params import Param, ParamStore


class Model:
    """A Sequential network bound to its ParamStore; owns the BN moment plumbing."""

    def __init__(self, net: Sequential, store: ParamStore):
        self.net = net
        self.store = store
        self.bn_layers: list[BatchNorm] = [m for m in walk(net) if isinstance(m, BatchNorm)]
        self.bn_moments_size = sum(bn.moments_size for bn in self.bn_layers)
        net.need_dx = False  # nobody needs the gradient of the input images
        # where each top-level layer's parameters start in the flat buffer (None: it has none); registration order
        # is layer order, so once layer i is back-propagated, grads[param_starts[i]:] are final
        self.param_starts = [min((v.offset for m in walk(layer) for v in vars(m).values() if isinstance(v, Param)),
                                 default=None) for layer in net.layers]

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        """x: (N, H, W, C) of the store's dtype -> logits (N, num_classes) (a fresh array)."""
        if x.dtype != self.store.dtype:
            x = x.astype(self.store.dtype)
        return self.net.forward(x, train)

    def backward(self, dlogits: np.ndarray, on_ready=None) -> None:
        """Back-propagate dL/dlogits (N, num_classes); writes (overwrites) every gradient in store.grads.
        on_ready(offset), when given, is called as backward goes: store.grads[offset:] is final (once per top-level
        layer with parameters, offsets decreasing), so a caller can send those gradients while the rest is computed.
        """
        dout = np.asarray(dlogits, dtype=self.store.dtype)
        if on_ready is None:
            self.net.backward(dout)
            return
        for layer, start in zip(reversed(self.net.layers), reversed(self.param_starts)):
            dout = layer.backward(dout)
            if start is not None:
                on_ready(start)

    def factor_layer(self):
        """The Linear whose weight gradient may travel as factors (the hidden one: 89 % of the default model's
        parameters), or None."""
        return next((m for layer in self.net.layers for m in walk(layer)
                     if isinstance(m, Linear) and m.w.name == "hidden.fc.w"), None)

    def bn_moments(self) -> np.ndarray:
        """Concatenated local [count, sum, sumsq] (float64) of every BN layer, in bn_layers order."""
        out = np.empty(self.bn_moments_size, np.float64)
        at = 0
        for bn in self.bn_layers:
            if bn.moments is None:
                raise RuntimeError("bn_moments() needs a train-mode forward first")
            out[at:at + bn.moments_size] = bn.moments
            at += bn.moments_size
        return out

    def update_running_stats(self, moments: np.ndarray, momentum: float) -> None:
        """Update every BN layer's running stats from a (possibly summed over workers) bn_moments() array."""
        if moments.shape != (self.bn_moments_size,):
            raise ValueError(f"moments: expected ({self.bn_moments_size},), got {moments.shape}")
        at = 0
        for bn in self.bn_layers:
            bn.update_running_stats(moments[at:at + bn.moments_size], momentum)
            at += bn.moments_size

    def set_bn_allreduce(self, allreduce: AllReduce | None) -> None:
        """Turn SyncBatchNorm on (a function summing a float64 array over workers) or off (None)."""
        for bn in self.bn_layers:
            bn.allreduce = allreduce

    def layers(self) -> list[Layer]:
        return list(walk(self.net))


def build_model(mcfg: ModelConfig, num_classes: int, image_size: int, store: ParamStore, in_channels: int = 3,
                rng: np.random.Generator | None = None) -> Model:
    """Register the network's tensors on `store` and return the Model.

    With `rng`, the store is allocated (and the weights initialised) here; without it the caller must call
    `store.allocate(rng)` (or `rebind`) before the first forward. `image_size` must be divisible by
    2 ** len(widths).
    """
    if image_size % (2 ** len(mcfg.widths)):
        raise ValueError(f"image_size {image_size} not divisible by 2**{len(mcfg.widths)}")
    layers: list[Layer] = []
    c, size = in_channels, image_size
    for i, width in enumerate(mcfg.widths, start=1):
        layers += [Conv2D(store, f"block{i}.conv", c, width, 3, 1, 1, bias=False, init=mcfg.init,
                          algo=mcfg.conv_algo),
                   BNPoolReLU(BatchNorm2D(store, f"block{i}.bn", width, mcfg.bn_eps), 2)]
        c, size = width, size // 2
    if mcfg.res_width:
        layers.append(ResidualBlock(store, "res", c, mcfg.res_width, 1, mcfg.bn_eps, init=mcfg.init,
                                    algo=mcfg.conv_algo, zero_init=mcfg.zero_init_residual))
        c = mcfg.res_width
    layers.append(Flatten())
    d = c * size * size
    if mcfg.hidden:
        layers += [Linear(store, "hidden.fc", d, mcfg.hidden, bias=True, init=mcfg.init),
                   BatchNorm1D(store, "hidden.bn", mcfg.hidden, mcfg.bn_eps), ReLU()]
        d = mcfg.hidden
    layers.append(Linear(store, "classifier", d, num_classes, bias=True, init="uniform"))
    model = Model(Sequential(layers), store)
    if rng is not None:
        store.allocate(rng)
    return model
