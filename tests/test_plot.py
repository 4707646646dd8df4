"""`dptrain plot` on a synthetic metrics.jsonl (the two record kinds train.py writes, a repeated step, a torn last
line): the records read back against the ones written (the repeated step's last value wins, the torn line is
skipped), the output against the PNG signature and the path the command prints."""
from __future__ import annotations

import json
import subprocess
import sys

from dptrain.inference.plot import plot_run, read_metrics


def write_metrics(run):
    run.mkdir()
    lines = []
    for epoch in range(3):
        for k in range(5):
            step = epoch * 5 + k
            lines.append({"step": step, "epoch": epoch, "loss": 4.0 / (step + 1), "acc": step / 15, "lr": 0.05,
                          "grad_norm": 1.0, "step_s": 0.5})
        lines.append({"epoch": epoch + 1, "step": (epoch + 1) * 5, "train_loss": 1.0 / (epoch + 1),
                      "train_acc": 0.3 * epoch, "val_loss": float("nan") if epoch == 0 else 1.2 / (epoch + 1),
                      "val_acc": 0.25 * epoch, "lr": 0.05, "images_per_s": 100.0})
    lines.append({"step": 14, "epoch": 2, "loss": 0.1, "acc": 0.9, "lr": 0.01, "grad_norm": 1.0, "step_s": 0.5})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 15, "ep')


def test_plot_run_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    steps, epochs = read_metrics(run / "metrics.jsonl")
    assert len(steps) == 15 and len(epochs) == 3 and steps[-1]["loss"] == 0.1  # the repeated step: last wins
    path = plot_run(run)
    assert path == run / "curves.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_plot_cli_output(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "dptrain", "plot", str(run), "-o", str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.exists()
