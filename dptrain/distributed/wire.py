"""float16 on the wire without losing the small numbers: a power-of-two scale per message.

A gradient of a mean loss is mostly 1e-4..1e-7 per element: cast straight to float16 most of it is subnormal
(absolute step 6e-8) or zero. Divided first by s = 2^(⌈log2 max|x|⌉ - 15), the largest element lands just under
float16's maximum and every element down to max·2^-29 keeps float16's full 11-bit precision; multiplying back by a
power of two is exact. Used for gradients going up (`--wire-dtype float16`) and for the weight *update* coming down:
the coordinator rounds its own update through the same encoding (`apply_update16`), so every host's copy of the
weights stays bitwise equal to the coordinator's while the downlink carries half the bytes.
"""
from __future__ import annotations

import math

import numpy as np

from ..optim import CHUNK

F16_TOP = 15  # max|x| / scale lands in [2^14, 2^15): below float16's 65504


def pow2_scale(x: np.ndarray) -> float:
    """The power of two to divide x by before casting to float16 (1.0 for an all-zero x)."""
    peak = 0.0
    for a in range(0, x.size, CHUNK):
        block = x[a:a + CHUNK]
        if block.size:
            peak = max(peak, float(np.max(np.abs(block))))
    if peak == 0.0 or not math.isfinite(peak):
        return 1.0
    return math.ldexp(1.0, math.frexp(peak)[1] - F16_TOP)


def encode16(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(float16 x / scale, scale)."""
    scale = pow2_scale(x)
    out = np.empty(x.size, np.float16) if out is None else out
    inv = np.float32(1.0 / scale)
    for a in range(0, x.size, CHUNK):
        np.multiply(x[a:a + CHUNK], inv, out=out[a:a + CHUNK], casting="unsafe")
    return out, scale


def add16(out: np.ndarray, x16: np.ndarray, scale: float, first: bool = False) -> None:
    """out (float32) += float32(x16) * scale, block by block (out = ... when first). The same float32 operations
    in the same order everywhere, so every process that applies a message gets the same bits."""
    s = np.float32(scale)
    tmp = np.empty(min(CHUNK, out.size), np.float32)
    for a in range(0, out.size, CHUNK):
        t = tmp[:min(CHUNK, out.size - a)]
        np.multiply(x16[a:a + CHUNK], s, out=t, casting="unsafe")
        if first:
            out[a:a + CHUNK] = t
        else:
            out[a:a + CHUNK] += t


def apply_update16(params: np.ndarray, prev: np.ndarray, out16: np.ndarray) -> float:
    """Coordinator side, after SGD: round the step (params - prev) through float16, set params = prev + rounded
    step (exactly what a host computes from the message) and prev = params. Returns the scale to send."""
    for a in range(0, params.size, CHUNK):  # the step, reusing params as scratch: params = params - prev
        np.subtract(params[a:a + CHUNK], prev[a:a + CHUNK], out=params[a:a + CHUNK])
    _, scale = encode16(params, out16)
    np.copyto(params, prev)
    add16(params, out16, scale)
    np.copyto(prev, params)
    return scale


def grad_frame(grads: np.ndarray, wire_dtype: str) -> tuple[np.ndarray, float]:
    """What a peer sends up: the float32 gradient itself, or its scaled float16 encoding. Returns (array, scale)."""
    if wire_dtype == "float16":
        return encode16(grads)
    return grads, 1.0


def receive_weights(params: np.ndarray, buffers: np.ndarray, arrays: dict, fields: dict) -> bool:
    """A peer with its own copies of the weights: take a full copy or apply an update. True when either came."""
    if "params" in arrays:
        np.copyto(params, arrays["params"])
    elif "update" in arrays:
        add16(params, arrays["update"], float(fields["update_scale"]))
    else:
        return False
    np.copyto(buffers, arrays["buffers"])
    return True
