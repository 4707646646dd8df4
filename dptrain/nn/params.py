"""Parameters, gradients and BatchNorm buffers as three flat arrays with named views.

Layers register tensors at build time (name, shape, init, decay); `ParamStore.allocate()` then creates one `(P,)`
array for weights, one for gradients and one `(B,)` array for running statistics, and hands every `Param` /
`Buffer` a view into them. Zero-grad is one fill, SGD is a few vector lines, the all-reduce moves one buffer and a
checkpoint is three arrays. `rebind()` moves the views onto other backing arrays (shared memory) keeping values.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Init = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def zeros(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape)


def ones(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape)


def he_normal(fan_in: int) -> Init:
    """Kaiming/He normal init for ReLU nets: std = sqrt(2 / fan_in)."""
    std = float(np.sqrt(2.0 / fan_in))
    return lambda rng, shape: rng.standard_normal(shape) * std


def uniform_fan_in(fan_in: int) -> Init:
    """PyTorch's default for the last Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = float(1.0 / np.sqrt(fan_in))
    return lambda rng, shape: rng.uniform(-bound, bound, shape)


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]
    offset: int
    init: Init
    decay: bool  # does weight decay apply (False for BN gamma/beta and biases unless configured)
    data: np.ndarray = field(default=None, repr=False)  # view into store.params
    grad: np.ndarray = field(default=None, repr=False)  # view into store.grads

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Buffer:
    name: str
    shape: tuple[int, ...]
    offset: int
    fill: float
    data: np.ndarray = field(default=None, repr=False)  # view into store.buffers

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class ParamStore:
    """Registry + flat storage. Register everything, then `allocate(rng)` once."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.param_list: list[Param] = []
        self.buffer_list: list[Buffer] = []
        self.num_params = 0
        self.num_buffers = 0
        self.params: np.ndarray | None = None
        self.grads: np.ndarray | None = None
        self.buffers: np.ndarray | None = None
        self._names: set[str] = set()

    def _claim(self, name: str) -> None:
        if self.params is not None:
            raise RuntimeError(f"cannot register {name!r}: store already allocated")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)

    def param(self, name: str, shape: tuple[int, ...], init: Init, decay: bool = True) -> Param:
        self._claim(name)
        p = Param(name, tuple(int(s) for s in shape), self.num_params, init, decay)
        self.param_list.append(p)
        self.num_params += p.size
        return p

    def buffer(self, name: str, shape: tuple[int, ...], fill: float = 0.0) -> Buffer:
        self._claim(name)
        b = Buffer(name, tuple(int(s) for s in shape), self.num_buffers, float(fill))
        self.buffer_list.append(b)
        self.num_buffers += b.size
        return b

    def allocate(self, rng: np.random.Generator) -> None:
        """Create the flat arrays and initialise them in registration order (so a seed fixes every weight)."""
        params = np.empty(self.num_params, self.dtype)
        for p in self.param_list:
            params[p.offset:p.offset + p.size] = np.asarray(p.init(rng, p.shape), dtype=np.float64).ravel()
        buffers = np.empty(self.num_buffers, self.dtype)
        for b in self.buffer_list:
            buffers[b.offset:b.offset + b.size] = b.fill
        self.rebind(params, np.zeros(self.num_params, self.dtype), buffers, copy=False)

    def rebind(self, params: np.ndarray, grads: np.ndarray, buffers: np.ndarray, copy: bool = True) -> None:
        """Point every view at new backing arrays (e.g. shared memory); with copy=True the current values move too."""
        for arr, n, what in ((params, self.num_params, "params"), (grads, self.num_params, "grads"),
                             (buffers, self.num_buffers, "buffers")):
            if arr.shape != (n,) or arr.dtype != self.dtype:
                raise ValueError(f"{what}: expected ({n},) {self.dtype}, got {arr.shape} {arr.dtype}")
        if copy and self.params is not None:
            params[...] = self.params
            grads[...] = self.grads
            buffers[...] = self.buffers
        self.params, self.grads, self.buffers = params, grads, buffers
        for p in self.param_list:
            p.data = params[p.offset:p.offset + p.size].reshape(p.shape)
            p.grad = grads[p.offset:p.offset + p.size].reshape(p.shape)
        for b in self.buffer_list:
            b.data = buffers[b.offset:b.offset + b.size].reshape(b.shape)

    def decay_ranges(self) -> list[tuple[int, int]]:
        """Merged [start, stop) ranges of the flat array that take weight decay."""
        out: list[tuple[int, int]] = []
        for p in self.param_list:
            if not p.decay:
                continue
            if out and out[-1][1] == p.offset:
                out[-1] = (out[-1][0], p.offset + p.size)
            else:
                out.append((p.offset, p.offset + p.size))
        return out
