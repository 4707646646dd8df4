"""`dptrain plot RUN`: a run's metrics.jsonl -> RUN/curves.png (or --output).

metrics.jsonl holds two kinds of lines (train.py writes both): per step {step, epoch, loss, acc, lr, grad_norm,
step_s} and per epoch {epoch, step, train_loss, train_acc, val_loss, val_acc, lr, images_per_s}. Top row: loss,
accuracy and learning rate per step; bottom row: train/val loss, train/val accuracy and img/s per epoch. A resumed
run may repeat steps or epochs: the last line for each one wins.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records sorted by step, epoch records sorted by epoch), last occurrence wins."""
    steps, epochs = {}, {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(path.read_text().splitlines()):  # a run killed mid-write leaves a partial last line
                continue
            raise ValueError(f"{path}:{n}: not JSON") from None
        if "train_loss" in rec:
            epochs[rec["epoch"]] = rec
        elif "loss" in rec:
            steps[rec["step"]] = rec
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    run = Path(run_dir)
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.exists():
        raise SystemExit(f"dptrain plot: {metrics} not found (is {run_dir} a run folder?)")
    steps, epochs = read_metrics(metrics)
    if not steps and not epochs:
        raise SystemExit(f"dptrain plot: {metrics} has no step or epoch records")
    out = Path(output) if output else metrics.parent / "curves.png"

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 3, figsize=(14, 7))
    s = [r["step"] for r in steps]
    for a, key, title in ((ax[0, 0], "loss", "loss per step"), (ax[0, 1], "acc", "accuracy per step"),
                          (ax[0, 2], "lr", "learning rate per step")):
        a.plot(*_finite(s, [r.get(key) for r in steps]), lw=0.8)
        a.set_title(title)
        a.set_xlabel("step")
    e = [r["epoch"] for r in epochs]
    for a, key, title in ((ax[1, 0], "loss", "loss per epoch"), (ax[1, 1], "acc", "accuracy per epoch")):
        for split in ("train", "val"):
            xs, ys = _finite(e, [r.get(f"{split}_{key}") for r in epochs])
            if ys:
                a.plot(xs, ys, "o-", label=split)
        a.set_title(title)
        a.set_xlabel("epoch")
        if a.lines:
            a.legend()
    ax[1, 2].plot(*_finite(e, [r.get("images_per_s") for r in epochs]), "o-")
    ax[1, 2].set_title("images / s per epoch")
    ax[1, 2].set_xlabel("epoch")
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.suptitle(str(metrics.parent))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
