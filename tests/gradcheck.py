"""Centred finite differences, the relative error every numeric test uses, and a kernel checker built on both
(CS231n gradient_check style)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def rel_error(a: np.ndarray, b: np.ndarray, tiny: float = 1e-12) -> float:
    """max|a - b| / max(max|a|, max|b|, tiny): one scale per tensor, so near-zero entries do not blow it up."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), tiny))


def norm_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """‖a - b‖₂ / ‖b‖₂: the whole tensor's relative error against the reference b (rounding spread over many
    elements shows here before any single element's does in rel_error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numeric_grad(f: Callable[[], float], x: np.ndarray, h: float = 1e-5,
                 indices: list[tuple[int, ...]] | None = None) -> np.ndarray:
    """d f() / d x by centred differences, perturbing x in place (every entry, or only `indices`; the others
    stay 0). f must read x afresh on every call."""
    grad = np.zeros_like(x, dtype=np.float64)
    for ix in (np.ndindex(*x.shape) if indices is None else indices):
        old = x[ix]
        x[ix] = old + h
        fp = f()
        x[ix] = old - h
        fm = f()
        x[ix] = old
        grad[ix] = (fp - fm) / (2 * h)
    return grad


def check_kernel(forward: Callable, backward: Callable, inputs: tuple, *args, seed: int = 0,
                 tol: float = 1e-6) -> None:
    """A kernel pair against finite differences of L = sum(out * dout) for a random dout, in float64.

    forward(*inputs, *args) -> (out, cache); backward(dout, cache) -> the gradient, or a tuple with one per input
    (an input that is None, such as an absent bias, is not checked).
    """
    out, cache = forward(*inputs, *args)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    grads = backward(dout, cache)
    grads = [None if g is None else np.array(g) for g in (grads if isinstance(grads, tuple) else (grads,))]

    def loss() -> float:
        return float(np.sum(forward(*inputs, *args)[0] * dout))

    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
        if x is not None:
            err = rel_error(g, numeric_grad(loss, x))
            assert err < tol, f"input {i}: rel error {err:.2e}"
