"""`dptrain bench` without --workers: training steps of one model in this process, on synthetic tensors.

A step is what the single-process trainer does per batch: forward, softmax cross-entropy, backward, the global
gradient norm (float64), clip and momentum SGD with weight decay. Per layer type and pass: milliseconds and, for the
GEMM layers (Conv2D, Linear), the achieved GFLOP/s next to this machine's measured float32 GEMM peak at the same
thread count (2048^3, best of 5), so the next bottleneck is visible. PyTorch (--compare torch) runs the same network
and the same step (clip_grad_norm_ + torch.optim.SGD) on the same tensors with the same number of threads.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .. import log
from ..config import Config
from ..nn import layers as L
from ..nn.loss import softmax_cross_entropy
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import set_threads
from ..nn.torch_ref import build_torch_model, require_torch, torch_sgd
from ..optim import SGD, clip_factor, sum_of_squares
from .report import median_row, paired_ratio


def gemm_flops(layer, out: np.ndarray) -> float:
    """Multiply-add FLOPs (x2) of a forward pass with output `out` (or of one GEMM of its backward, given dout, which
    has out's shape) as a direct GEMM does them: Conv2D N·OH·OW·k·k·C·F (whatever the algorithm: Winograd's are
    fewer, so its GFLOP/s are "effective"), Linear N·D·O; 0 for the other layers. Backward does it for dW and again
    for dx when the layer needs it."""
    if isinstance(layer, (L.Conv2D, L.Linear)):
        return 2.0 * out.size * (layer.w.data.size // layer.w.shape[-1])
    return 0.0


def instrument(model) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wrap every leaf layer's forward/backward to add its seconds to times[layer type] = [fwd_s, bwd_s] and its
    GEMM FLOPs to flops[layer type] = [fwd, bwd]."""
    times: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    flops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for layer in model.layers():
        if isinstance(layer, (L.Sequential, L.ResidualBlock)):
            continue  # containers: their leaves are timed (the residual add is left in "other")
        kind = type(layer).__name__
        for slot, meth in ((0, "forward"), (1, "backward")):
            orig = getattr(layer, meth)

            def timed(*a, _orig=orig, _kind=kind, _slot=slot, _layer=layer, **kw):
                t0 = time.perf_counter()
                r = _orig(*a, **kw)
                times[_kind][_slot] += time.perf_counter() - t0
                if _slot == 0:
                    flops[_kind][0] += gemm_flops(_layer, r)
                else:  # a[0] = dout: dW, and dx unless the layer returns none
                    flops[_kind][1] += gemm_flops(_layer, a[0]) * (2 if r is not None else 1)
                return r
            setattr(layer, meth, timed)
    return times, flops


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 GEMM speed with `threads` BLAS threads: the best of `repeats` n x n x n products."""
    a, b = (np.random.default_rng(i).standard_normal((n, n)).astype(np.float32) for i in (0, 1))
    c = np.empty((n, n), np.float32)
    best = math.inf
    with threadpool_limits(threads):
        np.matmul(a, b, out=c)
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def gemm_rate(m: int, n: int, k: int, threads: int = 1, repeats: int = 5) -> float:
    """Float32 FLOP/s of the factored Linear's dW GEMM shape, x^T (m x n) @ dy (n x k) with x stored (n, m) as the
    factors are, with `threads` BLAS threads: the best of `repeats`."""
    x, dy = (np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in ((0, (n, m)), (1, (n, k))))
    out = np.empty((m, k), np.float32)
    best = math.inf
    with threadpool_limits(threads):
        np.matmul(x.T, dy, out=out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(x.T, dy, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * m * n * k / best


def synthetic_batch(batch: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)  # (N, H, W, C)
    return x, rng.integers(0, classes, batch)


def _timed_loop(step, warmup: int, steps: int, desc: str, progress: bool) -> list[float]:
    for _ in tqdm(range(warmup), desc=f"{desc} warm-up", leave=False, disable=not progress or not warmup):
        step()
    secs = []
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        t0 = time.perf_counter()
        step()
        secs.append(time.perf_counter() - t0)
    return secs


def time_numpy(cfg: Config, classes: int, warmup: int, steps: int, progress: bool = True,
               factored: bool = False) -> dict:
    """factored: the model's factored Linear (model.factor_layer) leaves its (x, dy) instead of computing its weight
    gradient, as a worker's does when its host computes dW from the factors (dist.factored); backward then also
    copies them into arrays of their own, as the worker does into the host's shared factor slots."""
    t, batch, size = cfg.train, cfg.train.batch_size, cfg.data.image_size
    x, y = synthetic_batch(batch, size, classes)
    store = ParamStore(np.float32)
    model = build_model(cfg.model, classes, size, store, rng=np.random.default_rng(0))
    layer = model.factor_layer() if factored else None
    if layer is not None:
        layer.factored = True
        slots = (np.empty((batch, layer.w.shape[0]), np.float32), np.empty((batch, layer.w.shape[1]), np.float32))
    opt = SGD(store.num_params, momentum=t.momentum, weight_decay=t.weight_decay, decay_ranges=store.decay_ranges())
    times, flops = instrument(model)
    phase = defaultdict(float)
    fwd_bwd: list[float] = []  # per timed step: forward + loss + backward, seconds

    def step():
        t0 = time.perf_counter()
        logits = model.forward(x, train=True)
        t1 = time.perf_counter()
        _, dlogits, _ = softmax_cross_entropy(logits, y, batch)
        t2 = time.perf_counter()
        model.backward(dlogits)
        if layer is not None:  # worker._leave_factors
            slots[0][...], slots[1][...] = layer.factors
        t3 = time.perf_counter()
        norm = math.sqrt(sum_of_squares(store.grads))
        t4 = time.perf_counter()
        opt.step(store.params, store.grads, t.lr, scale=clip_factor(norm, t.clip_norm))
        model.update_running_stats(model.bn_moments(), cfg.model.bn_momentum)
        t5 = time.perf_counter()
        for k, dt in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2), ("grad_norm", t4 - t3),
                      ("sgd_update", t5 - t4)):
            phase[k] += dt
        fwd_bwd.append(t3 - t0)

    for _ in range(warmup):
        step()
    times.clear()
    flops.clear()
    phase.clear()
    fwd_bwd.clear()
    secs = _timed_loop(step, 0, steps, "numpy", progress)
    n = len(secs)
    layers = {k: {"forward_ms": f * 1e3 / n, "backward_ms": b * 1e3 / n} for k, (f, b) in times.items()}
    for k, (f, b) in flops.items():
        if f:  # GEMM layers: achieved (effective) GFLOP/s per pass
            layers[k].update(forward_gflops=f / times[k][0] / 1e9, backward_gflops=b / times[k][1] / 1e9)
    return {"step_ms": 1e3 * float(np.median(secs)), "images_per_s": batch / float(np.median(secs)),
            "phases_ms": {k: v * 1e3 / n for k, v in phase.items()}, "layers_ms": layers,
            "num_params": store.num_params, "factored": layer is not None,
            "forward_backward_ms": [1e3 * t for t in fwd_bwd]}


def time_torch(cfg: Config, classes: int, threads: int, warmup: int, steps: int, progress: bool = True,
               optimizer: bool = True) -> dict:
    """PyTorch's step of the same network on the same tensors (optimizer=False: forward + loss + backward only,
    what the plan's DDP rows compute per rank)."""
    torch = require_torch()
    torch.set_num_threads(threads)
    batch, size = cfg.train.batch_size, cfg.data.image_size
    x, y = synthetic_batch(batch, size, classes)
    net = build_torch_model(cfg.model, classes, size)
    opt = torch_sgd(net, cfg.train)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)  # NHWC -> NCHW

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.clip_norm)
            opt.step()

    secs = _timed_loop(step, warmup, steps, "torch", progress)
    return {"step_ms": 1e3 * float(np.median(secs)), "images_per_s": batch / float(np.median(secs)),
            "torch_version": torch.__version__, "steps_ms": [1e3 * t for t in secs]}


def run_local_bench(cfg: Config, classes: int, threads: int, warmup: int, steps: int, compare_torch: bool,
                    progress: bool = True, rounds: int = 1) -> dict:
    """One JSON-able result: our img/s and breakdown, and PyTorch's img/s and the ratio when asked. rounds > 1: both
    timed that many times, the order reversed every other round; the median round's breakdown, median img/s, and the
    ratio as the median of each round's own (`*_rounds`: every round's figures, in order)."""
    lg = log.get()
    if compare_torch:
        require_torch()  # fail before spending minutes on our side
    lg.info(f"single process: batch {cfg.train.batch_size}, {cfg.data.image_size}x{cfg.data.image_size}, "
            f"{classes} classes, {threads} thread(s), {warmup} warm-up + {steps} timed steps")
    def time_ours() -> dict:
        prev = set_threads(threads)  # non-GEMM kernels use as many threads as BLAS
        try:
            return time_numpy(cfg, classes, warmup, steps, progress)
        finally:
            set_threads(prev)

    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    with threadpool_limits(threads):
        for rnd in range(rounds):
            jobs = [("ours", time_ours)] + ([("theirs", lambda: time_torch(cfg, classes, threads, warmup, steps,
                                                                        progress))] if compare_torch else [])
            for side, job in jobs if rnd % 2 == 0 else jobs[::-1]:
                runs[side].append(job())
    ours = median_row(runs["ours"])
    theirs = median_row(runs["theirs"]) if compare_torch else None
    peak = gemm_peak_gflops(threads)
    for v in ours["layers_ms"].values():
        for p in ("forward", "backward"):
            if f"{p}_gflops" in v:
                v[f"{p}_pct_of_peak"] = 100.0 * v[f"{p}_gflops"] / peak
    out = {"mode": "single", "threads": threads, "batch_size": cfg.train.batch_size,
           "image_size": cfg.data.image_size, "classes": classes, "steps": steps, "warmup": warmup,
           "conv_algo": cfg.model.conv_algo, "gemm_peak_gflops": peak, **ours}
    if theirs:
        out.update(torch_images_per_s=theirs["images_per_s"], torch_step_ms=theirs["step_ms"],
                   torch_version=theirs["torch_version"])
        out["ratio_vs_torch"], ratios = paired_ratio(ours, theirs)
        if ratios is not None:
            out.update(torch_images_per_s_rounds=theirs["images_per_s_rounds"], ratio_rounds=ratios)
    return out


def format_local(r: dict) -> str:
    lines = [f"threads={r['threads']} batch={r['batch_size']} image={r['image_size']}x{r['image_size']}x3 "
             f"classes={r['classes']} params={r['num_params']:,} (median of {r['steps']} steps)",
             f"dptrain : {r['step_ms']:8.1f} ms/step {r['images_per_s']:8.1f} img/s"]
    if "torch_images_per_s" in r:
        lines.append(f"torch   : {r['torch_step_ms']:8.1f} ms/step {r['torch_images_per_s']:8.1f} img/s   "
                     f"dptrain/torch = {r['ratio_vs_torch']:.2f}x  (torch {r['torch_version']})")
    if "images_per_s_rounds" in r:
        lines.append(f"{r['rounds']} rounds, img/s: dptrain " + " ".join(f"{v:.1f}" for v in r["images_per_s_rounds"])
                     + ("; torch " + " ".join(f"{v:.1f}" for v in r["torch_images_per_s_rounds"])
                        + "; dptrain/torch " + " ".join(f"{v:.2f}" for v in r["ratio_rounds"])
                        if "ratio_rounds" in r else ""))
    lines.append("\nphase (mean ms/step): " + "  ".join(f"{k} {v:.1f}" for k, v in r["phases_ms"].items()))
    lines.append(f"\n{'layer type':<14}{'fwd ms':>9}{'bwd ms':>9}   GFLOP/s fwd, bwd (% of the GEMM peak, "
                 f"{r['gemm_peak_gflops']:.0f} GFLOP/s at {r['threads']} thread(s); conv: direct-conv FLOPs)")
    for k, v in sorted(r["layers_ms"].items(), key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"])):
        rate = (f"   {v['forward_gflops']:6.1f} ({v['forward_pct_of_peak']:3.0f} %), {v['backward_gflops']:6.1f} "
                f"({v['backward_pct_of_peak']:3.0f} %)") if "forward_gflops" in v else "   memory-bound"
        lines.append(f"{k:<14}{v['forward_ms']:9.1f}{v['backward_ms']:9.1f}{rate}")
    return "\n".join(lines)
