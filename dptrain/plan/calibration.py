"""The plan's compute calibration: a few real training steps at two batch sizes, cached per CPU model."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

from threadpoolctl import threadpool_limits

from .. import config as config_mod, log
from ..bench.local import gemm_rate, time_numpy, time_torch
from ..fsutil import atomic_write
from ..nn.threads import cpu_model, set_threads
from .model import CALIBRATION_BATCHES, CALIBRATION_FILE, CostModel, factor_shape

# the factored Linear's dW GEMM as calibrate() times it: (GEMM_ROWS x GEMM_BATCH) @ (GEMM_BATCH x F), one core. An
# owner's rows at 16 hosts (16384 / 16) over a global batch of 512: the rate is flat from there up and lower at tiny
# batches, where dW costs little anyway (figures: docs/performance-notes.md, plan, gemm_flops_per_s)
GEMM_ROWS, GEMM_BATCH = 1024, 512

# ---------------------------------------------------------------------------------------------- calibration

def calibration_path() -> Path:
    return Path(os.environ.get("DPTRAIN_CACHE") or "~/.cache/dptrain").expanduser() / CALIBRATION_FILE


def _key(cfg: config_mod.Config, classes: int, cpu: str) -> dict:
    return {"cpu_model": cpu, "model": dataclasses.asdict(cfg.model), "image_size": cfg.data.image_size,
            "classes": classes}


def fit_affine(points: dict[int, float]) -> tuple[float, float]:
    """(ms_per_step, ms_per_image) through two (batch, ms) points; a negative part is dropped (noise)."""
    (b0, t0), (b1, t1) = sorted(points.items())[:1] + sorted(points.items())[-1:]
    slope = (t1 - t0) / (b1 - b0) if b1 != b0 else t1 / b1
    fixed = t0 - b0 * slope
    if slope <= 0 or fixed < 0:
        return 0.0, t1 / b1
    return fixed, slope


def _step_ms(cfg: config_mod.Config, classes: int, warmup: int, steps: int, factored: bool) -> dict:
    """One BLAS thread, one thread for the other kernels: a worker's forward + loss + backward (ms) and SGD."""
    prev = set_threads(1)
    try:
        with threadpool_limits(1):
            r = time_numpy(cfg, classes, warmup, steps, progress=False, factored=factored)
    finally:
        set_threads(prev)
    p = r["phases_ms"]
    # the fastest step's forward + loss + backward: other work on a shared box only ever adds time (a median of 3
    # moved the 32-image step by 5 % between two calibrations on the 2-core Xeon; the fastest of 5, by 1 %)
    steps_ms = r.get("forward_backward_ms") or [p["forward"] + p["loss"] + p["backward"]]
    return {"ms": min(steps_ms), "factored": r.get("factored", False),
            "sgd_ns": (p["grad_norm"] + p["sgd_update"]) * 1e6 / r["num_params"]}


def _torch_ms(cfg: config_mod.Config, classes: int, warmup: int, steps: int) -> tuple[float, str] | None:
    """PyTorch's forward + loss + backward of the same network, one thread (a DDP rank's compute): (the fastest
    step's ms, torch's version), or None where torch is not installed."""
    try:
        import torch  # noqa: F401 - optional: only the DDP rows' compute
    except ImportError:
        return None
    prev = set_threads(1)
    try:
        with threadpool_limits(1):
            r = time_torch(cfg, classes, 1, warmup, steps, progress=False, optimizer=False)
    finally:
        set_threads(prev)
    return min(r["steps_ms"]), r["torch_version"]  # the fastest, as _step_ms


def calibrate(cfg: config_mod.Config, classes: int, batches=CALIBRATION_BATCHES, warmup: int = 1,
              steps: int = 5) -> dict:
    """Time forward + loss + backward of the model at each batch (one BLAS thread, warm-up excluded), also with its
    factored Linear factored (ms_per_step_factored, ms_per_image_factored; None when the model has none), one
    core's GEMM rate on that layer's dW = X^T dY (gemm_flops_per_s), and where PyTorch is installed its forward +
    backward of the same network (ddp_ms_per_step, ddp_ms_per_image: what a DDP rank computes)."""
    points, fpoints, sgd_ns, tpoints, torch_version = {}, {}, [], {}, None
    shape = factor_shape(cfg, classes)
    for b in batches:
        c = copy.deepcopy(cfg)
        c.train.batch_size = b
        n = steps + (2 if b <= 8 else 0)
        r = _step_ms(c, classes, warmup, n, False)
        points[b] = r["ms"]
        sgd_ns.append(r["sgd_ns"])
        if shape is not None:
            fpoints[b] = _step_ms(c, classes, warmup, n, True)["ms"]
        t = _torch_ms(c, classes, warmup + 1, n)
        if t is not None:
            tpoints[b], torch_version = t
    fixed, slope = fit_affine(points)
    entry = {**_key(cfg, classes, cpu_model()), "ms_per_step": fixed, "ms_per_image": slope,
             "batches": list(batches), "measured_ms": {str(b): t for b, t in points.items()},
             "measured_update_ns_per_param": min(sgd_ns), "ms_per_step_factored": None,
             "ms_per_image_factored": None}
    if fpoints:
        ffixed, fslope = fit_affine(fpoints)
        entry.update(ms_per_step_factored=ffixed, ms_per_image_factored=fslope,
                     measured_ms_factored={str(b): t for b, t in fpoints.items()})
    entry.update(ddp_ms_per_step=None, ddp_ms_per_image=None)
    if tpoints:
        tfixed, tslope = fit_affine(tpoints)
        entry.update(ddp_ms_per_step=tfixed, ddp_ms_per_image=tslope, torch_version=torch_version,
                     measured_ms_torch={str(b): t for b, t in tpoints.items()})
    F = shape[1] if shape is not None else 512
    entry["gemm_flops_per_s"] = gemm_rate(GEMM_ROWS, GEMM_BATCH, F, threads=1)
    entry["gemm_shape"] = [GEMM_ROWS, GEMM_BATCH, F]
    entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return entry


def load_calibration(cfg: config_mod.Config, classes: int, path: Path | None = None) -> dict | None:
    path = path or calibration_path()
    try:
        entries = json.loads(path.read_text())["entries"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.get().warning(f"{path}: unreadable calibration cache ({e}); calibrating again")
        return None
    key = _key(cfg, classes, cpu_model())
    for e in entries:
        if isinstance(e, dict) and all(e.get(k) == v for k, v in key.items()):
            return e
    return None


def save_calibration(entry: dict, path: Path | None = None) -> Path:
    path = path or calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(path.read_text())["entries"]
        if not isinstance(entries, list):
            entries = []
    except (OSError, ValueError, KeyError, TypeError):
        entries = []
    keys = ("cpu_model", "model", "image_size", "classes")
    entries = [e for e in entries if not (isinstance(e, dict) and all(e.get(k) == entry[k] for k in keys))]
    entries.append(entry)
    blob = json.dumps({"version": 1, "entries": entries}, indent=1).encode()
    atomic_write(path, lambda f: f.write(blob))
    return path


def compute_source(args, cfg: config_mod.Config, classes: int) -> tuple[float, float, str, dict]:
    """(ms_per_step, ms_per_image, where they come from, the rest: {"ms_per_step_factored", "ms_per_image_factored",
    "gemm_flops_per_s"}, None where not measured). Given compute (--compute-ms-per-image) has no factored figures;
    a cache entry from before they were measured neither (nor a GEMM rate): the unfactored figures and CostModel's
    default GEMM rate stand in, and the description says so."""
    lg = log.get()
    none = {"ms_per_step_factored": None, "ms_per_image_factored": None, "gemm_flops_per_s": None,
            "ddp_ms_per_step": None, "ddp_ms_per_image": None}
    if args.compute_ms_per_image is not None:
        return args.compute_ms_per_step, args.compute_ms_per_image, "given", none
    entry = None if args.calibrate else load_calibration(cfg, classes)
    if entry is None:
        lg.info(f"calibrating: training steps of the model at batch {' and '.join(map(str, CALIBRATION_BATCHES))}, "
                "1 BLAS thread, factored and not, in this process")
        entry = calibrate(cfg, classes)
        where = save_calibration(entry)
        lg.info(f"saved the calibration to {where}")
        how = "calibrated now"
    else:
        how = f"calibration of {entry.get('created', '?')}"
    more = {k: (float(entry[k]) if entry.get(k) is not None else None) for k in none}
    if more["ms_per_image_factored"] is not None:
        factored = (f"factored step {more['ms_per_step_factored'] or 0.0:.1f} ms + "
                    f"{more['ms_per_image_factored']:.2f} ms/image")
    elif "ms_per_image_factored" in entry:  # measured: the model has no factored Linear
        factored = "no factored Linear"
    else:
        factored = "no factored step in this older entry (--calibrate measures it): the unfactored figures stand in"
    gemm = (f"GEMM {more['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s a core" if more["gemm_flops_per_s"] else
            f"GEMM rate not in this entry: the default {CostModel(1.0).gemm_flops_per_s / 1e9:.0f} GFLOP/s a core")
    if more["ddp_ms_per_image"] is not None:
        ddp = (f"DDP ranks compute as PyTorch {entry.get('torch_version', '?')} measured: "
               f"{more['ddp_ms_per_step'] or 0.0:.1f} ms + {more['ddp_ms_per_image']:.2f} ms/image")
    elif "ddp_ms_per_image" in entry:
        ddp = "PyTorch not installed when calibrated: DDP ranks compute as dptrain does"
    else:
        ddp = "no PyTorch step in this older entry (--calibrate measures it): DDP ranks compute as dptrain does"
    return (float(entry["ms_per_step"]), float(entry["ms_per_image"]),
            f"{how}, batch {' and '.join(map(str, entry.get('batches', [])))}, {entry['cpu_model']}, "
            f"1 BLAS thread; its SGD measured {entry.get('measured_update_ns_per_param', float('nan')):.1f} ns/param; "
            f"{factored}; {gemm}; {ddp}", more)
