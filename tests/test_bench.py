"""`dptrain bench` end to end with a tiny model: the single-process JSON and the multi-worker CSV/JSON/PNG outputs.

Nothing is compared against a reference here (throughput is machine-dependent): the tests check that the bench runs
the real paths (the trainer's step in this process; launch_local with real worker processes) and reports numbers.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

TINY = ["--batch-size", "16", "--image-size", "16", "--classes", "10", "--steps", "2", "--warmup", "1",
        "--no-progress", "--model.widths=[8]", "--model.res_width=0", "--model.hidden=16"]


def run_cli(args, tmp_path, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "dptrain", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_single_process_json(tmp_path):
    proc = run_cli(["--json", *TINY], tmp_path)
    r = json.loads(proc.stdout)  # stdout is exactly one JSON object; logs went to stderr
    assert r["images_per_s"] > 0
    assert r["mode"] == "single" and r["threads"] == 1
    assert set(r["phases_ms"]) >= {"forward", "backward", "sgd_update"}
    assert "Conv2D" in r["layers_ms"]


def test_workers_write_csv_json_png(tmp_path):
    out = tmp_path / "bench-out"
    proc = run_cli(["--workers", "1,2", "--json", "--images", "200", "--data-dir", str(tmp_path / "data"),
                    "--out", str(out), *TINY], tmp_path, timeout=180)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["workers"] for r in rows] == [1, 2]
    for r in rows:
        assert r["images_per_s"] > 0 and r["impl"] == "dptrain" and r["transport"] == "shm"
        assert 0 <= r["coordinator_frac"] <= 1 and r["compute_s"] > 0
    assert rows[0]["speedup"] == 1.0
    with open(out / "bench.csv") as f:
        assert [int(r["workers"]) for r in csv.DictReader(f)] == [1, 2]
    assert len(json.loads((out / "bench.json").read_text())) == 2
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
