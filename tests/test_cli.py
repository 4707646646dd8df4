"""The `dptrain` command line as a user runs it (`python -m dptrain ...` in a subprocess, timeout on each): the
printed JSON against the files the command wrote (run folder, synthetic layout), eval's accuracy against the
in-process evaluate_checkpoint, and bad flags against a non-zero exit with a message naming the problem."""
import json
import os
import subprocess
import sys

import pytest

from dptrain.inference.evaluate import evaluate_checkpoint

TIMEOUT_S = 120


def dptrain(*args, cwd=None):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dptrain", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=cwd, env=env)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = dptrain("data", "synth", "--out", root / "set", "--classes", 6, "--image-size", 32, "--rich", 6)
    assert r.returncode == 0, r.stderr
    return root, last_json(r.stdout)


def test_data_synth_writes_the_layout(synth_set):
    root, summary = synth_set
    people = sorted(p for p in (root / "set").iterdir() if p.is_dir())
    assert [p.name for p in people] == [f"Person_{i:04d}" for i in range(1, 7)]
    files = sorted((root / "set").rglob("*.jpg"))
    assert len(files) == summary["num_images"] and summary["num_classes"] == 6 and summary["image_size"] == 32
    assert all(f.name.startswith(f.parent.name + "_") for f in files)
    assert json.loads((root / "set" / "summary.json").read_text())["num_images"] == summary["num_images"]


@pytest.fixture(scope="module")
def trained(synth_set):
    root, _ = synth_set
    cfg = root / "tiny.toml"
    cfg.write_text('[data]\nimage_size = 32\nmin_images_per_class = 5\n'
                   f'cache_dir = "{root / "cache"}"\n'
                   '[model]\nwidths = [8, 16]\nres_width = 16\nhidden = 32\n'
                   '[train]\nepochs = 2\nbatch_size = 16\nprogress = false\n')
    out = root / "run"
    r = dptrain("train", "--config", cfg, "--data", root / "set", "--out", out, "--lr", 0.05, "--train.patience=3",
                "--train.seed", 5)
    assert r.returncode == 0, r.stderr
    return root, out, last_json(r.stdout), r


def test_train_writes_the_run_folder(trained):
    root, out, summary, r = trained
    for name in ("config.toml", "metrics.jsonl", "summary.json", "best.npz", "last.npz"):
        assert (out / name).exists(), name
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["num_classes"] == 6
    saved = (out / "config.toml").read_text()
    assert "lr = 0.05" in saved and "seed = 5" in saved and "patience = 3" in saved and "widths = [8, 16]" in saved
    assert "epoch 2:" in r.stderr  # logs go to stderr, stdout stays machine-readable
    import csv
    with open(out / "metrics.csv", newline="") as f:  # for spreadsheets: the same rows as metrics.jsonl
        rows = list(csv.DictReader(f))
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) and [r["kind"] for r in rows].count("epoch") == 2
    assert float(rows[0]["loss"]) == lines[0]["loss"] and rows[-1]["val_acc"] == str(lines[-1]["val_acc"])


def test_eval_prints_accuracy_json(trained):
    root, out, summary, _ = trained
    r = dptrain("eval", "--checkpoint", out / "best.npz", "--data", root / "set", "--batch-size", 32)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert 0 <= res["accuracy"] <= 1 and res["num_images"] == summary["num_images"]
    assert res["accuracy"] == evaluate_checkpoint(out / "best.npz", root / "set")["accuracy"]


def test_resume_a_finished_run_uses_its_saved_config(trained):
    root, out, summary, _ = trained
    r = dptrain("train", "--resume", "--out", out, "--data", root / "set")  # no --config: OUT/config.toml
    assert r.returncode == 0, r.stderr
    again = last_json(r.stdout)
    assert again["steps"] == summary["steps"] and again["best_val_acc"] == summary["best_val_acc"]
    assert "resumed from" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "--lrr", "0.1"], "--lrr"),
    (["train", "--train.lrr=0.1"], "train.lrr"),
    (["train", "--train.epochs=two"], "train.epochs"),
    (["train", "--epochs", "two"], "--epochs"),
    (["train", "--config", "/nonexistent/x.toml"], "x.toml"),
    (["train", "--train.lr"], "--train.lr"),
    (["train", "--data", "/nonexistent/faces", "--out", "/nonexistent/run"], "/nonexistent/faces"),
    (["eval", "--data", "somewhere"], "--checkpoint"),
    (["eval", "--checkpoint", "c.npz", "--data", "d", "--bogus"], "--bogus"),
    (["data", "synth"], "--out"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_flags_fail_clearly(args, needle):
    r = dptrain(*args)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_eval_of_a_missing_checkpoint_fails_clearly(tmp_path, synth_set):
    root, _ = synth_set
    r = dptrain("eval", "--checkpoint", tmp_path / "nope.npz", "--data", root / "set")
    assert r.returncode != 0 and "nope.npz" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_resume_from_a_corrupt_checkpoint_fails_clearly(trained, tmp_path):
    root, out, _, _ = trained
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.toml").write_text((out / "config.toml").read_text())
    (broken / "last.npz").write_bytes((out / "last.npz").read_bytes()[:1000])  # truncated
    r = dptrain("train", "--resume", "--out", broken, "--data", root / "set")
    assert r.returncode != 0 and "last.npz" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_stop_and_resume_in_new_processes_equals_one_run(trained, tmp_path):
    """--stop-at-step then --resume, each its own process, against one uninterrupted process: bitwise weights."""
    import numpy as np

    from dptrain import checkpoint

    root, _, _, _ = trained
    common = ["--config", root / "tiny.toml", "--data", root / "set", "--epochs", 2]
    assert dptrain("train", *common, "--out", tmp_path / "one").returncode == 0
    r = dptrain("train", *common, "--out", tmp_path / "two", "--stop-at-step", 5)
    assert r.returncode == 0 and last_json(r.stdout)["interrupted"], r.stderr
    r = dptrain("train", "--resume", "--out", tmp_path / "two", "--data", root / "set")
    assert r.returncode == 0, r.stderr
    a, _ = checkpoint.load(tmp_path / "one" / "last.npz")
    b, _ = checkpoint.load(tmp_path / "two" / "last.npz")
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k
