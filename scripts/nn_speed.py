"""Training-step throughput of the NumPy model vs the same network in PyTorch eager, plus a per-layer breakdown.

    python scripts/nn_speed.py [--threads 1] [--batch 64] [--size 64] [--classes 62] [--warmup 2] [--steps 5]

A step is forward + loss + backward (no optimizer) in float32. BLAS threads are limited with threadpoolctl (NumPy)
and torch.set_num_threads (PyTorch). PyTorch is skipped when it is not installed.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

from dptrain.config import ModelConfig
from dptrain.nn import layers as L
from dptrain.nn.loss import softmax_cross_entropy
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore


def instrument(model) -> dict[str, list[float]]:
    """Wrap every leaf layer's forward/backward to accumulate seconds per (layer, direction)."""
    times: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    counts: dict[str, int] = defaultdict(int)
    for layer in model.layers():
        if isinstance(layer, (L.Sequential, L.ResidualBlock)):
            continue
        kind = type(layer).__name__
        counts[kind] += 1
        label = getattr(layer, "name", f"{kind.lower()}{counts[kind]}")
        for slot, meth in ((0, "forward"), (1, "backward")):
            orig = getattr(layer, meth)

            def timed(*a, _orig=orig, _label=label, _slot=slot):
                t0 = time.perf_counter()
                r = _orig(*a)
                times[_label][_slot] += time.perf_counter() - t0
                return r
            setattr(layer, meth, timed)
    return times


def time_numpy(args, x, y) -> tuple[float, dict]:
    store = ParamStore(np.float32)
    model = build_model(ModelConfig(), args.classes, args.size, store, rng=np.random.default_rng(0))
    times = instrument(model)

    def step():
        _, d, _ = softmax_cross_entropy(model.forward(x, True), y)
        model.backward(d)
    for _ in range(args.warmup):
        step()
    times.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - t0) / args.steps, dict(times)


def time_torch(args, x, y) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    nn = torch.nn
    torch.set_num_threads(args.threads)

    class Res(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.main = nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.main(x) + self.short(x))

    mods, c = [], 3
    for w in ModelConfig().widths:
        mods += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    s = args.size // 8
    net = nn.Sequential(*mods, Res(c, 256), nn.Flatten(), nn.Linear(256 * s * s, 512), nn.BatchNorm1d(512),
                        nn.ReLU(), nn.Linear(512, args.classes)).train()
    xt, yt = torch.tensor(x.transpose(0, 3, 1, 2).copy()), torch.tensor(y)

    def step():
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(xt), yt).backward()
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, args.classes, args.batch)
    with threadpool_limits(args.threads):
        sec, times = time_numpy(args, x, y)
        tsec = None if args.no_torch else time_torch(args, x, y)
    print(f"threads={args.threads} batch={args.batch} image={args.size}x{args.size}x3 classes={args.classes}")
    print(f"numpy : {sec * 1e3:8.1f} ms/step  {args.batch / sec:7.1f} img/s")
    if tsec is not None:
        print(f"torch : {tsec * 1e3:8.1f} ms/step  {args.batch / tsec:7.1f} img/s   ratio numpy/torch "
              f"{tsec / sec:.2f}")
    print(f"\n{'layer':<18}{'fwd ms':>9}{'bwd ms':>9}")
    for label, (f, b) in times.items():
        print(f"{label:<18}{f * 1e3 / args.steps:9.1f}{b * 1e3 / args.steps:9.1f}")
    tot_f = sum(v[0] for v in times.values()) * 1e3 / args.steps
    tot_b = sum(v[1] for v in times.values()) * 1e3 / args.steps
    print(f"{'sum of layers':<18}{tot_f:9.1f}{tot_b:9.1f}")


if __name__ == "__main__":
    main()
