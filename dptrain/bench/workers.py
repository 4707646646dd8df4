"""`dptrain bench --workers 1,2,4,8`: the real coordinator and workers (launch_local) on a synthetic face set.

For each N this runs `dptrain launch --workers N` in this process (the coordinator is this process; the workers are
real `python -m dptrain worker` children) for warm-up + timed steps of one short epoch, with the run's Chrome-trace
timeline on, and reads back what the run itself recorded:
    img/s         global batch x timed steps / Σ step_s of the timed steps (metrics.jsonl; warm-up excluded)
    compute       per step, the slowest worker's load + forward + backward (timeline rows "rank R")
    comm          the rest of the coordinator's round: scatter, result messages, waiting (socket: gradient and
                  weight frames too)
    coordinator   reduce (Σ gradient slots in rank order) + clip + SGD + BN update ("reduce", "clip+update")
    PSS           peak Σ proportional set size of this process and its workers, sampled every second with psutil
                  (shared-memory pages are split between the processes that map them, so the image cache counts once)
The data set is rendered once by dptrain.data.synth (equal images per class) into a cache folder and decoded through
the trainer's own loader, so the run includes the shared-memory image cache and the on-the-fly augmentation.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from .. import config as config_mod, log
from ..data.synth import generate
from ..launcher.local import launch_local


def synth_dataset(images: int, image_size: int, classes: int, data_dir: str | None, progress: bool = True) -> Path:
    """Folder of ~`images` JPEGs (images // classes per class), generated once and reused."""
    per = max(2, images // classes)
    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "dptrain" / "bench"
    out = root / f"synth-{classes}x{per}-{image_size}px"
    if not (out / "summary.json").exists():
        log.get().info(f"rendering {classes * per} synthetic images into {out} (once)")
        generate(out, num_classes=classes, image_size=image_size, num_rich=classes, max_images=per, min_rich=per,
                 workers=os.cpu_count() or 1, progress=progress)
    return out


class PssSampler(threading.Thread):
    """Peak Σ PSS of a process tree (this process + its children), sampled every interval_s until `until()` says
    the timed steps have begun. A sample is not free: reading a worker's PSS walks its ~1 GB of mappings (11-26 ms
    of kernel time each at 8 workers), ~0.15 s of a core per sample of 9 processes, which would tax N = 8 more
    than N = 2 if taken while the steps are timed; the memory is at its peak from the first step on (every
    workspace and shared buffer touched), so the warm-up steps are where it is measured."""

    def __init__(self, expect_workers: int, interval_s: float = 1.0, until=None):
        super().__init__(daemon=True)
        self.expect_workers, self.until = expect_workers, until
        self.interval_s, self.stop_event = interval_s, threading.Event()
        self.peak_total, self.peak_procs = 0, {}

    def sample(self) -> None:
        me = psutil.Process()
        procs, total = {}, 0
        for p in [me] + me.children(recursive=True):
            try:
                pss = p.memory_full_info().pss
            except (psutil.Error, AttributeError):
                continue
            procs[f"{'coordinator' if p.pid == me.pid else 'worker'}:{p.pid}"] = pss
            total += pss
        if total > self.peak_total:
            self.peak_total, self.peak_procs = total, procs

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):  # the first sample after interval_s: workers are up
            if self.until is not None and self.until():
                return
            self.sample()

    def stop(self) -> dict:
        self.stop_event.set()
        if self.is_alive():
            self.join()
        mb = 1 / 2**20
        workers = [v * mb for k, v in self.peak_procs.items() if k.startswith("worker")]
        coord = [v * mb for k, v in self.peak_procs.items() if k.startswith("coordinator")]
        if len(workers) < self.expect_workers:  # the run ended before a sample saw every worker
            return {"pss_total_mb": None, "pss_coordinator_mb": None, "pss_worker_mean_mb": None,
                    "pss_worker_max_mb": None, "pss_procs": len(self.peak_procs)}
        return {"pss_total_mb": self.peak_total * mb, "pss_coordinator_mb": coord[0] if coord else 0.0,
                "pss_worker_mean_mb": sum(workers) / len(workers) if workers else 0.0,
                "pss_worker_max_mb": max(workers, default=0.0), "pss_procs": len(self.peak_procs)}


def split_from_timeline(trace_path: Path, first_step: int, end_step: int | None = None) -> dict:
    """Mean seconds per timed step (first_step <= step < end_step) of each phase, from the run's Chrome trace."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    coord = defaultdict(lambda: defaultdict(float))  # step -> name -> s
    busy = defaultdict(lambda: defaultdict(float))  # step -> rank row -> s
    for e in events:
        step = e["args"]["step"]
        if step < first_step or (end_step is not None and step >= end_step):
            continue
        if e["tid"] == "coordinator":
            coord[step][e["name"]] += e["dur"] / 1e6
        elif e["name"] not in ("wait", "send"):
            busy[step][e["tid"]] += e["dur"] / 1e6
    steps = sorted(s for s in coord if "clip+update" in coord[s])
    if not steps:
        raise RuntimeError(f"{trace_path}: no timed steps in the timeline")
    mean = lambda f: sum(f(s) for s in steps) / len(steps)  # noqa: E731
    compute = mean(lambda s: max(busy[s].values(), default=0.0))
    rnd, red, upd = (mean(lambda s, k=k: coord[s][k]) for k in ("round", "reduce", "clip+update"))
    step = rnd + red + upd
    return {"step_s": step, "compute_s": compute, "comm_s": max(rnd - compute, 0.0), "reduce_s": red,
            "update_s": upd, "timed_steps": len(steps)}


def run_workers(n: int, data: Path, out_root: Path, args, overrides: dict[str, str], transport: str) -> dict:
    """Train warm-up + timed steps with N real workers; returns one result row."""
    batch = args.batch_size
    total = args.warmup + args.steps
    run_dir = out_root / f"run-{transport}-w{n}"
    if run_dir.exists():
        for f in run_dir.glob("*"):
            if f.is_file():
                f.unlink()
    per_epoch = max(1, args.images // batch)  # val_fraction 0: every image is a training image
    epochs = 1 if per_epoch >= total else math.ceil(total / per_epoch)
    ov = {"data.path": str(data), "data.image_size": str(args.image_size), "data.val_fraction": "0.0",
          "data.min_images_per_class": "1", "train.batch_size": str(batch), "train.epochs": str(epochs),
          "train.steps_per_epoch": str(min(per_epoch, total)), "train.patience": "0", "train.out": str(run_dir),
          "train.progress": "false" if args.no_progress else "true", "dist.workers": str(n),
          "dist.transport": transport, "dist.timeline": str(run_dir / "timeline.json"), **overrides}
    cfg = config_mod.load(None, ov)
    # with warm-up steps, PSS is sampled during them only (PssSampler), often enough to see a step through
    until = (lambda: steps_recorded(run_dir / "metrics.jsonl") >= args.warmup) if args.warmup else None
    sampler = PssSampler(n, min(args.pss_interval, 0.2) if until else args.pss_interval, until)
    if args.pss_interval > 0:
        sampler.start()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # launch prints its summary; our stdout is for --json
        rc = launch_local(cfg)
    wall = time.perf_counter() - t0
    mem = sampler.stop()
    if rc != 0:
        raise RuntimeError(f"launch with {n} workers exited {rc}; logs in {run_dir / 'logs'}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if "step_s" in r and r["step"] >= args.warmup]
    ips = batch * len(timed) / sum(r["step_s"] for r in timed)
    row = {"impl": "dptrain", "transport": transport, "workers": n, "images_per_s": ips,
           "blas_threads": cfg.dist.blas_threads or max(1, (os.cpu_count() or 1) // n), "wall_s": wall,
           **split_from_timeline(run_dir / "timeline.json", args.warmup), **mem}
    # serial: the coordinator alone between the workers' phases (its decisions, bookkeeping; with update by the
    # coordinator also the sum and SGD), measured by the executor over every step
    breakdown = json.loads((run_dir / "summary.json").read_text())["breakdown"]
    row["serial_s"], row["update_by"] = breakdown["serial_s"], breakdown["update_by"]
    row["coordinator_frac"] = row["serial_s"] / row["step_s"]
    row["images_mb"] = len_images_mb(run_dir, args.images, args.image_size)
    return row


def steps_recorded(metrics: Path) -> int:
    """How many steps a run's metrics.jsonl holds so far (0 before it exists)."""
    try:
        return metrics.read_bytes().count(b'"step_s"')
    except OSError:
        return 0


def len_images_mb(run_dir: Path, images: int, image_size: int) -> float:
    """Size of the uint8 image cache (from the run's summary counts when present)."""
    try:
        n = json.loads((run_dir / "summary.json").read_text()).get("num_images", images)
    except (OSError, ValueError):
        n = images
    return n * image_size * image_size * 3 / 2**20
