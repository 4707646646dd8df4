"""`dptrain bench --tta TARGET`: time to accuracy (DAWNBench style), dptrain against its PyTorch twin.

    dptrain bench --tta 0.9 [--config configs/synth.toml] [--data DIR] [--workers 2] [--epochs E] [--repeat R]
                  [--seeds 0,1,2] [--stop-at-target] [--no-torch] [--out bench-tta] [--json] [--section.key=value ...]

One resolved config (defaults < --config < flags) is written to OUT/config.toml and both sides train from it, one
after the other, never at the same time: `dptrain launch --workers N` (run folder OUT/dptrain), then the PyTorch
twin (dptrain/bench/tta_torch.py: DDP gloo with N ranks, the same data, split, batches, augmentation, schedule and
optimizer; PyTorch's own initialisation and kernels). The decode cache is filled first, so neither side pays for
decoding. Each side is timed from the moment its process is started (imports, data loading and start-up included) to
the moment each epoch's validation line reaches its metrics file (polled every POLL_S). Reported per side: epochs
and seconds to the first epoch whose validation accuracy is >= TARGET (null when never reached), final and best
validation accuracy, wall seconds; and the ratios dptrain / torch. With --repeat R the sides alternate (d t t d ...)
and the medians are reported. With --seeds S1,S2,... every seed is a run per side (train.seed: its own
initialisation, train/val split and batches), the medians (and trimmed means, tta_stats.py: a run that never gets
there counts as the slowest) are over all runs, `reached` counts the runs that hit the target, `per_seed` how many
seeds dptrain needed fewer / as many / more epochs on, and `mean_val_acc` is each side's validation accuracy per
epoch averaged over the runs that got there (a target near an epoch's mean accuracy is crossed a seed at a time:
the curve says which side is ahead). --tta-merge A.json B.json ... summarises the runs of several results as one.
--stop-at-target ends a side once it reaches the target (dptrain gets SIGTERM: it finishes the step and saves).
Writes OUT/tta.json and OUT/tta.png (validation accuracy against wall time, both sides, the target as a line). The
CPU model and the load average before each run are in the JSON: wall seconds on a shared machine are noisy, epochs
are not.

    dptrain data digits --out data/digits [--image-size 32]
writes scikit-learn's 1797 handwritten digits (8x8, 10 classes; needs scikit-learn) as RGB PNGs in class folders,
a small real image set for the benchmark.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import config as config_mod, log
from ..data.dataset import load_dataset
from ..flags import parse_overrides
from ..nn.threads import cpu_model
from ..nn.torch_ref import require_torch
from .tta_stats import SIDES, merge, summarise_sides
from .tta_torch import TORCH_BN_EPS, TORCH_BN_MOMENTUM

POLL_S = 0.05


def resolve(args, extra: list[str]) -> config_mod.Config:
    overrides = {}
    for flag, key in (("data", "data.path"), ("epochs", "train.epochs"), ("batch_size", "train.batch_size"),
                      ("image_size", "data.image_size")):
        if getattr(args, flag, None) is not None:
            overrides[key] = str(getattr(args, flag))
    overrides.update(parse_overrides(extra))
    overrides.update({"train.out": str(Path(args.out) / "dptrain"), "train.progress": "false",
                      "dist.workers": str(args.workers)})
    try:
        return config_mod.load(args.config, overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain bench --tta: config error: {e}") from None


def time_process(cmd: list[str], metrics: Path, target: float | None, logfile: Path, env: dict | None = None,
                 signal_group: bool = False) -> dict:
    """Run cmd; stamp each epoch line appended to `metrics` with seconds since the start. With `target`, stop the
    process (SIGTERM; to its whole process group with signal_group) after the first epoch at or above it."""
    curve, seen, stopped = [], 0, False
    load = os.getloadavg()[0]
    with open(logfile, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            done = proc.poll() is not None
            if metrics.exists() and metrics.stat().st_size > seen:
                with open(metrics) as f:
                    f.seek(seen)
                    chunk = f.read()
                now = time.perf_counter() - t0
                complete = chunk[:chunk.rfind("\n") + 1]
                seen += len(complete.encode())
                for line in complete.splitlines():
                    r = json.loads(line)
                    if "val_acc" in r and "train_loss" in r:
                        curve.append({"epoch": r["epoch"], "val_acc": r["val_acc"], "train_loss": r["train_loss"],
                                      "seconds": round(now, 3)})
                if target is not None and not stopped and curve and curve[-1]["val_acc"] >= target:
                    stopped = True
                    (os.killpg(proc.pid, signal.SIGTERM) if signal_group else proc.terminate())
            if done:
                break
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    if proc.returncode not in (0, 130) and not stopped:
        raise SystemExit(f"dptrain bench --tta: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}); "
                         f"see {logfile}")
    return {"curve": curve, "wall_s": round(wall, 3), "load_avg_before": round(load, 2), "stopped_at_target": stopped}


def summarise(run: dict, target: float) -> dict:
    curve = run["curve"]
    hit = next((p for p in curve if p["val_acc"] >= target), None)
    return {**run, "epochs_to_target": hit and hit["epoch"], "seconds_to_target": hit and hit["seconds"],
            "final_val_acc": curve[-1]["val_acc"] if curve else None,
            "best_val_acc": max((p["val_acc"] for p in curve), default=None), "epochs_run": len(curve)}


def run_side(side: str, cfg_path: Path, out: Path, workers: int, target: float | None) -> dict:
    folder = out / side
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if side == "dptrain":
        cmd = [sys.executable, "-m", "dptrain", "launch", "--config", str(cfg_path)]
        return time_process(cmd, folder / "metrics.jsonl", target, out / f"{side}.log")
    threads = max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "dptrain.bench.tta_torch", "--config", str(cfg_path), "--workers", str(workers),
           "--metrics", str(folder / "metrics.jsonl"), "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return time_process(cmd, folder / "metrics.jsonl", target, out / f"{side}.log", env, signal_group=True)


def run(args, extra: list[str]) -> int:
    lg = log.get()
    target = float(args.tta)
    if not 0 < target <= 1:
        raise SystemExit(f"dptrain bench --tta: the target is a validation accuracy in (0, 1], got {target}")
    args.workers = int(args.workers or 2)
    sides = [x for x in SIDES if x in args.sides.split(",") and not (x == "torch" and args.no_torch)]
    if not sides:
        raise SystemExit(f"dptrain bench --tta: --sides wants dptrain and/or torch, got {args.sides!r}")
    if "torch" in sides:
        require_torch()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(args, extra)
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if getattr(args, "seeds", None) else [cfg.train.seed]
    except ValueError:
        raise SystemExit(f"dptrain bench --tta: --seeds wants a comma list of integers, got {args.seeds!r}") from None
    cfg_path = out / "config.toml"
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order = [s for i in range(args.repeat) for s in (sides if i % 2 == 0 else sides[::-1])]
    for seed in seeds:
        cfg.train.seed = seed
        cfg_path.write_text(config_mod.dumps(cfg))
        ds = load_dataset(cfg.data, cfg.train.seed, progress=not args.no_progress)  # fills the decode cache
        for side in order:
            lg.info(f"{side}: {args.workers} worker(s), {cfg.train.epochs} epochs, target {target}, seed {seed}")
            r = summarise(run_side(side, cfg_path, out, args.workers,
                                   target if args.stop_at_target else None), target) | {"seed": seed}
            runs[side].append(r)
            lg.info(f"  {side}: target at epoch {r['epochs_to_target']} / {r['seconds_to_target']} s; final val "
                    f"acc {r['final_val_acc']}, wall {r['wall_s']} s")
    result = {"target": target, "cpu": cpu_model(), "cpus": os.cpu_count(), "workers": args.workers, "seeds": seeds,
              "dataset": {"path": cfg.data.path, **ds.counts, "image_size": cfg.data.image_size},
              "recipe": {k: getattr(cfg.train, k) for k in ("epochs", "batch_size", "lr", "warmup_epochs",
                                                             "momentum", "weight_decay", "clip_norm", "label_smoothing",
                                                             "ema_epochs")}
              | {"augment": cfg.data.augment, "max_shift": cfg.data.max_shift},
              "dptrain_model": {"init": cfg.model.init, "bn_momentum": cfg.model.bn_momentum,
                                "bn_eps": cfg.model.bn_eps},
              "torch_model": {"init": "pytorch", "bn_momentum": TORCH_BN_MOMENTUM, "bn_eps": TORCH_BN_EPS}}
    return report(summarise_sides(result, runs), sides, out, args.json)


def report(result: dict, sides: list[str], out: Path, as_json: bool) -> int:
    """OUT/tta.json, OUT/tta.png and the summary on stdout (JSON, or the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tta.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, sides, out / "tta.png")
    print(json.dumps(result) if as_json else format_result(result, sides), flush=True)
    if not as_json:
        print(f"\nwrote {out / 'tta.json'}, {out / 'tta.png'}", flush=True)
    return 0


def run_merge(args) -> int:
    """`dptrain bench --tta-merge A.json B.json ... [--out DIR]`: the runs of several results, summarised as one."""
    result = merge(args.tta_merge)
    return report(result, [s for s in SIDES if s in result], Path(args.out), args.json)


def format_result(r: dict, sides: list[str]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"time to {r['target']:.3f} val acc, {r['workers']} workers, {r['cpu']} ({r['cpus']} CPUs)",
             f"{'':<9}{'epochs':>8}{'seconds':>9}{'final acc':>11}{'best acc':>10}{'wall s':>8}"]
    for s in sides:
        x = r[s]
        lines.append(f"{s:<9}{fmt(x['epochs_to_target'], '8g')}{fmt(x['seconds_to_target'], '9.1f')}"
                     f"{fmt(x['final_val_acc'], '11.4f')}{fmt(x['best_val_acc'], '10.4f')}{fmt(x['wall_s'], '8.1f')}")
    if "seconds_to_target_ratio" in r:
        lines.append(f"dptrain / torch: epochs {fmt(r['epochs_to_target_ratio'], '.2f')}, seconds "
                     f"{fmt(r['seconds_to_target_ratio'], '.2f')} (medians; a run that never reaches the target "
                     f"counts as the slowest)")
    if any(r[x].get("trimmed_epochs_to_target") is not None for x in sides):
        lines.append("without the fastest and slowest run (MLPerf): " + "; ".join(
            f"{x} {fmt(r[x]['trimmed_epochs_to_target'], '.2f')} epochs, "
            f"{fmt(r[x]['trimmed_seconds_to_target'], '.1f')} s" for x in sides))
    if r.get("per_seed"):
        q = r["per_seed"]
        lines.append(f"per seed, dptrain needed fewer epochs on {q['fewer']}, as many on {q['equal']}, more on "
                     f"{q['more']}")
    if any(len(r[x]["runs"]) > 1 for x in sides):  # medians above; each run, and the mean curves, below
        for x in sides:
            runs = r[x]["runs"]
            lines.append(f"{x}: reached the target in {r[x]['reached']} of {len(runs)} runs; per run (seed: epochs, "
                         f"seconds) " + ", ".join(f"{q['seed']}: {fmt(q['epochs_to_target'], 'g')}, "
                                                  f"{fmt(q['seconds_to_target'], '.1f')}" for q in runs))
            lines.append(f"{x}: mean val acc by epoch " + " ".join(
                f"{p['val_acc']:.3f}" + (f" ({p['runs']} runs)" if p["runs"] < len(runs) else "")
                for p in r[x]["mean_val_acc"]))
    return "\n".join(lines)


def plot(r: dict, sides: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, color in ((s, c) for s, c in zip(SIDES, ("C0", "C1")) if s in sides):
        for i, run in enumerate(r[side]["runs"]):
            ts, acc = [p["seconds"] for p in run["curve"]], [p["val_acc"] for p in run["curve"]]
            ax.plot(ts, acc, "o-", color=color, alpha=1.0 if i == 0 else 0.4, ms=3,
                    label=side if i == 0 else None)
            if run["seconds_to_target"] is not None:
                ax.plot([run["seconds_to_target"]], [r["target"]], "*", color=color, ms=12)
    ax.axhline(r["target"], color="grey", ls=":", label=f"target {r['target']}")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since process start")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"time to accuracy, {r['workers']} workers, {r['dataset']['image_size']} px ({r['cpu']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
