"""The plan's compute calibration: a few real training steps at two batch sizes, cached per CPU model."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

from .. import config as config_mod, log
from ..bench.local import run_local_bench
from ..fsutil import atomic_write
from .model import CALIBRATION_BATCHES, CALIBRATION_FILE

# ---------------------------------------------------------------------------------------------- calibration

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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


def calibrate(cfg: config_mod.Config, classes: int, batches=CALIBRATION_BATCHES, warmup: int = 1,
              steps: int = 3) -> dict:
    """Time forward + loss + backward of the model at each batch (one BLAS thread, warm-up excluded)."""
    points, sgd_ns = {}, []
    for b in batches:
        c = copy.deepcopy(cfg)
        c.train.batch_size = b
        r = run_local_bench(c, classes, 1, warmup, steps + (2 if b <= 8 else 0), False, progress=False)
        p = r["phases_ms"]
        points[b] = p["forward"] + p["loss"] + p["backward"]
        sgd_ns.append((p["grad_norm"] + p["sgd_update"]) * 1e6 / r["num_params"])
    fixed, slope = fit_affine(points)
    return {**_key(cfg, classes, cpu_model()), "ms_per_step": fixed, "ms_per_image": slope,
            "batches": list(batches), "measured_ms": {str(b): t for b, t in points.items()},
            "measured_update_ns_per_param": min(sgd_ns), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


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


def compute_source(args, cfg: config_mod.Config, classes: int) -> tuple[float, float, str]:
    """(ms_per_step, ms_per_image, where they come from)."""
    lg = log.get()
    if args.compute_ms_per_image is not None:
        return args.compute_ms_per_step, args.compute_ms_per_image, "given"
    entry = None if args.calibrate else load_calibration(cfg, classes)
    if entry is None:
        lg.info(f"calibrating: training steps of the model at batch {' and '.join(map(str, CALIBRATION_BATCHES))}, "
                "1 BLAS thread, in this process")
        entry = calibrate(cfg, classes)
        where = save_calibration(entry)
        lg.info(f"saved the calibration to {where}")
        how = "calibrated now"
    else:
        how = f"calibration of {entry.get('created', '?')}"
    return (float(entry["ms_per_step"]), float(entry["ms_per_image"]),
            f"{how}, batch {' and '.join(map(str, entry.get('batches', [])))}, {entry['cpu_model']}, "
            f"1 BLAS thread; its SGD measured {entry.get('measured_update_ns_per_param', float('nan')):.1f} ns/param")
