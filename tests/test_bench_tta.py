"""`dptrain bench --tta` end to end on a tiny two-class set and a tiny model: both sides train (the PyTorch twin only
when torch is installed), the JSON has epochs/seconds to the target per side and the PNG is a PNG. A low target, so
any working run reaches it; nothing is compared across sides (wall time is machine-dependent)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
from PIL import Image

HAS_TORCH = importlib.util.find_spec("torch") is not None
TINY = ["--image-size", "16", "--batch-size", "16", "--epochs", "2", "--no-progress", "--model.widths=[4]",
        "--model.res_width=0", "--model.hidden=8", "--data.min_images_per_class=2", "--train.tensorboard=false"]


def make_set(root, per_class=32, size=16):
    """Two classes a small CNN separates at once: dark and bright noise."""
    rng = np.random.default_rng(0)
    for c, base in enumerate((40, 200)):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{c}" / f"{i:03d}.png")


def test_tta_json_and_png(tmp_path):
    make_set(tmp_path / "data")
    out = tmp_path / "tta"
    cmd = [sys.executable, "-m", "dptrain", "bench", "--tta", "0.5", "--data", str(tmp_path / "data"), "--out",
           str(out), "--workers", "2", "--json", "--data.cache_dir", str(tmp_path / "cache"), *TINY]
    if not HAS_TORCH:
        cmd.append("--no-torch")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r == json.loads((out / "tta.json").read_text())
    assert r["target"] == 0.5 and r["workers"] == 2 and r["cpu"]
    assert r["dataset"]["num_classes"] == 2 and r["recipe"]["epochs"] == 2
    for side in ("dptrain", "torch") if HAS_TORCH else ("dptrain",):
        s = r[side]
        assert len(s["runs"]) == 1 and len(s["runs"][0]["curve"]) == 2
        assert s["epochs_to_target"] in (1, 2), s
        assert 0 < s["seconds_to_target"] <= s["wall_s"]
        assert s["best_val_acc"] >= 0.5 and 0 <= s["final_val_acc"] <= 1
        times = [p["seconds"] for p in s["runs"][0]["curve"]]
        assert times == sorted(times)
    if HAS_TORCH:
        assert r["seconds_to_target_ratio"] > 0
    assert (out / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.toml").exists() and (out / "dptrain" / "metrics.jsonl").exists()


def test_tta_rejects_a_target_outside_0_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dptrain", "bench", "--tta", "1.5", "--no-torch"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and "target" in proc.stderr


def test_tta_over_seeds_reports_every_run_and_the_mean_curve(tmp_path):
    """--seeds 3,4: a run per seed (each its own train.seed, so its own split and initialisation), medians over the
    runs, `reached` and the validation accuracy per epoch averaged over the runs (checked against the runs' own
    curves), and the human-readable form lists each run."""
    make_set(tmp_path / "data")
    out = tmp_path / "tta"
    base = [sys.executable, "-m", "dptrain", "bench", "--tta", "0.5", "--data", str(tmp_path / "data"), "--out",
            str(out), "--workers", "2", "--sides", "dptrain", "--seeds", "3,4", "--data.cache_dir",
            str(tmp_path / "cache"), *TINY]
    proc = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["seeds"] == [3, 4]
    s = r["dptrain"]
    assert [q["seed"] for q in s["runs"]] == [3, 4]
    assert s["reached"] == sum(q["epochs_to_target"] is not None for q in s["runs"])
    for e, point in enumerate(s["mean_val_acc"], start=1):
        accs = [q["curve"][e - 1]["val_acc"] for q in s["runs"] if len(q["curve"]) >= e]
        assert point["epoch"] == e and point["runs"] == len(accs)
        assert abs(point["val_acc"] - sum(accs) / len(accs)) < 1e-4
    bad = subprocess.run(base[:-len(TINY)] + ["--seeds", "1,x"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert bad.returncode != 0 and "--seeds" in bad.stderr
