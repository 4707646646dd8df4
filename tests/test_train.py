"""The Trainer against itself and against chance: a run stopped mid-epoch and resumed equals the uninterrupted run
bitwise (params, velocity, BN buffers, every metrics line but the timings); early stopping against a constructed
case whose validation accuracy cannot improve (lr = 0, frozen BN statistics); the run folder's files against the
fields they promise; the best checkpoint against the val accuracy it was saved for; and a few epochs on a small
synthetic set against chance (must beat it by > 5x)."""
import json
import math

import numpy as np
import pytest
from helpers import make_config

from dptrain import checkpoint, config as C
from dptrain.data import synth
from dptrain.executors import LocalExecutor
from dptrain.train import prepare, run_local

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root / "set", num_classes=NUM_CLASSES, seed=1, image_size=32, num_rich=NUM_CLASSES,
                   max_images=40, min_rich=30, progress=False)
    return root


def make_cfg(data, out, **overrides):
    return make_config({"data.path": data / "set", "data.image_size": 32, "data.min_images_per_class": 10,
                        "data.cache_dir": data / "cache", "model.widths": [8, 16], "model.res_width": 16,
                        "model.hidden": 32, "train.epochs": 3, "train.batch_size": 32, "train.lr": 0.05,
                        "train.out": out, "train.progress": False, **overrides})


def read_metrics(out):
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "train_loss" in r]
    steps = [r for r in lines if "train_loss" not in r]
    return epochs, steps


def _without(records, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


@pytest.fixture(scope="module")
def full_run(data):
    out = data / "full"
    cfg = make_cfg(data, out)
    return cfg, out, run_local(cfg)


@pytest.mark.parametrize("stop_at_step", [11, 8])  # mid-epoch 2; exactly at the epoch 1/2 boundary
@pytest.mark.numerics
def test_resume_is_bitwise_exact(data, full_run, stop_at_step):
    cfg_a, out_a, summary_a = full_run
    out_b = data / f"resumed{stop_at_step}"
    cfg_b = make_cfg(data, out_b)
    first = run_local(cfg_b, stop_at_step=stop_at_step)
    assert first["interrupted"] and first["steps"] == stop_at_step
    _, meta = checkpoint.load(out_b / "last.npz")
    steps_per_epoch = summary_a["steps"] // summary_a["epochs_run"]
    assert (meta["epoch"], meta["step_in_epoch"]) == divmod(stop_at_step, steps_per_epoch)
    second = run_local(cfg_b, resume=True)
    assert not second["interrupted"]
    for name in ("last", "best"):
        a, meta_a = checkpoint.load(out_a / f"{name}.npz")
        b, meta_b = checkpoint.load(out_b / f"{name}.npz")
        for k in ("params", "velocity", "buffers"):
            assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), f"{name}.{k}"
        meta_a["config"]["train"]["out"] = meta_b["config"]["train"]["out"]
        assert _without([meta_a], "epoch_sums") == _without([meta_b], "epoch_sums"), name
    epochs_a, steps_a = read_metrics(out_a)
    epochs_b, steps_b = read_metrics(out_b)
    assert _without(epochs_a, "images_per_s") == _without(epochs_b, "images_per_s")
    assert _without(steps_a, "step_s") == _without(steps_b, "step_s")
    for k in ("best_val_acc", "best_epoch", "epochs_run", "epoch", "steps"):
        assert summary_a[k] == second[k], k


def test_early_stopping_when_val_acc_cannot_improve(data):
    """lr = 0 and BN momentum 0: the network never changes, so epoch 1 is the best and every later epoch is a bad
    one; with patience 2 the run must stop after epoch 3 of 10."""
    out = data / "early"
    cfg = make_cfg(data, out, **{"train.lr": 0.0, "model.bn_momentum": 0.0, "train.epochs": 10,
                                 "train.patience": 2, "train.steps_per_epoch": 2})
    summary = run_local(cfg)
    assert summary["stopped_early"] and not summary["interrupted"]
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    epochs, _ = read_metrics(out)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert len({r["val_acc"] for r in epochs}) == 1  # the construction holds: nothing could improve
    _, meta = checkpoint.load(out / "last.npz")
    assert meta["bad_epochs"] == 2

    out0 = data / "no_early"
    summary0 = run_local(make_cfg(data, out0, **{"train.lr": 0.0, "model.bn_momentum": 0.0, "train.epochs": 4,
                                                 "train.patience": 0, "train.steps_per_epoch": 1}))
    assert summary0["epochs_run"] == 4 and not summary0["stopped_early"]  # patience 0: never stop early


def test_run_folder_contents(data, full_run):
    cfg, out, summary = full_run
    epochs, steps = read_metrics(out)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for r in epochs:
        assert {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= set(r)
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["images_per_s"] > 0
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["lr"] > 0
    assert len(steps) == summary["steps"] and [r["step"] for r in steps] == list(range(summary["steps"]))
    for r in steps:
        assert {"step", "epoch", "loss", "acc", "lr", "grad_norm", "step_s"} <= set(r)
    # the epoch lines' train loss is the count-weighted mean of that epoch's step losses (equal batches here)
    for e, r in enumerate(epochs):
        mine = [s["loss"] for s in steps if s["epoch"] == e]
        assert r["train_loss"] == pytest.approx(np.mean(mine), rel=1e-9)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for k in ("best_val_acc", "best_epoch", "epochs_run", "wall_s", "num_classes", "num_images", "num_train",
              "num_val", "num_skipped"):
        assert k in on_disk, k
    assert on_disk["num_classes"] == NUM_CLASSES and on_disk["num_train"] + on_disk["num_val"] == on_disk["num_images"]
    assert on_disk["epochs_run"] == 3 and on_disk["wall_s"] > 0
    assert on_disk["best_val_acc"] == max(r["val_acc"] for r in epochs)
    assert epochs[on_disk["best_epoch"] - 1]["val_acc"] == on_disk["best_val_acc"]

    assert (out / "best.npz").exists() and (out / "last.npz").exists()
    # best.npz is written as a second name of the improving epoch's last.npz (no second 37 MB write): the same file
    # exactly when the best epoch is the last one
    same = (out / "best.npz").stat().st_ino == (out / "last.npz").stat().st_ino
    assert same == (on_disk["best_epoch"] == on_disk["epochs_run"])
    assert C.load(out / "config.toml") == cfg  # saved and reloadable, equal to the config that ran

    # best.npz holds the weights that scored best_val_acc: restoring it reproduces that accuracy exactly
    tr = prepare(cfg, resume=False)
    tr.restore(out / "best.npz")
    loss_sum, correct = LocalExecutor(cfg, tr.model, tr.ds, tr.store, tr.opt).evaluate(tr.ds.val_idx)
    assert correct / len(tr.ds.val_idx) == on_disk["best_val_acc"]


def test_restore_refuses_another_model(data, full_run):
    cfg, out, _ = full_run
    other = make_cfg(data, data / "other", **{"model.hidden": 16})
    tr = prepare(other, resume=False)
    with pytest.raises(checkpoint.CheckpointError, match="last.npz"):
        tr.restore(out / "last.npz")


def test_too_few_images_for_a_batch(data):
    with pytest.raises(ValueError, match="fewer than one batch"):
        prepare(make_cfg(data, data / "big_batch", **{"train.batch_size": 100000}), resume=False)


def test_learns_well_above_chance(data):
    """End to end on 10 synthetic identities: > 5x chance on the held-out split within 8 short epochs."""
    out = data / "learn"
    summary = run_local(make_cfg(data, out, **{"train.epochs": 8}))
    epochs, _ = read_metrics(out)
    assert summary["best_val_acc"] > 5.0 / NUM_CLASSES, epochs
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert summary["wall_s"] < 60


def test_resume_after_a_crash_drops_metrics_written_after_the_checkpoint(data, full_run):
    """A kill -9 after a periodic checkpoint leaves metrics lines for steps the resumed run will redo; after the
    resume metrics.jsonl must still read like the uninterrupted run's (no duplicated or orphaned lines)."""
    cfg_a, out_a, _ = full_run
    out_b = data / "crashed"
    cfg_b = make_cfg(data, out_b)
    run_local(cfg_b, stop_at_step=10)  # last.npz at step 10 (epoch 2, step 2 of 8)
    with open(out_b / "metrics.jsonl", "a") as f:  # what the killed process had written past its checkpoint
        f.write(json.dumps({"step": 10, "epoch": 1, "loss": 9.0, "acc": 0.0, "lr": 0.0, "grad_norm": 0.0,
                            "step_s": 0.1}) + "\n")
        f.write(json.dumps({"step": 11, "epoch": 1, "loss": 9.0, "acc": 0.0, "lr": 0.0, "grad_norm": 0.0,
                            "step_s": 0.1}) + "\n")
        f.write('{"step": 12, "epo')  # torn last line
    run_local(cfg_b, resume=True)
    epochs_a, steps_a = read_metrics(out_a)
    epochs_b, steps_b = read_metrics(out_b)
    assert _without(epochs_a, "images_per_s") == _without(epochs_b, "images_per_s")
    assert _without(steps_a, "step_s") == _without(steps_b, "step_s")


def test_progress_without_a_terminal_is_periodic_log_lines(monkeypatch, caplog):
    """Batch jobs and CI: no bar (their stderr is a file), one line per PROGRESS_EVERY_S instead."""
    import logging

    from dptrain import metrics
    monkeypatch.setattr(metrics, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="dptrain")
    p = metrics.Progress(4, 1, "epoch 1/2", enabled=True)  # resumed at step 1 of the epoch
    assert not p.tty and p.lines  # pytest's stderr is not a terminal
    p.step("loss 1.000")
    p.step("loss 0.900")
    p.close()
    assert "epoch 1/2: step 3/4 (75 %), loss 0.900" in caplog.text
    quiet = metrics.Progress(4, 0, "epoch 1/2", enabled=False)  # train.progress = false: nothing at all
    quiet.step("loss 1.0")
    assert "step 1/4" not in caplog.text


def test_tensorboard_events_read_back_with_tensorboards_own_reader(tiny_data, tmp_path):
    """The Trainer writes one event file (one writer: this process); TensorBoard's EventAccumulator reads the step
    and epoch scalars back with the values of metrics.jsonl."""
    import json

    pytest = __import__("pytest")
    pytest.importorskip("tensorboardX")
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from helpers import TINY_TOML, make_config

    from dptrain.train import run_local
    cfg = make_config({"data.path": str(tiny_data), "data.cache_dir": str(tiny_data.parent / "cache"),
                       "train.out": str(tmp_path / "run"), "train.epochs": 2, "train.steps_per_epoch": 3,
                       "train.progress": False, "data.min_images_per_class": 10}, toml=TINY_TOML)
    run_local(cfg)
    files = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = ea_mod.EventAccumulator(str(files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "train/grad_norm", "train/images_per_s", "time/step_s",
            "epoch/train_loss", "epoch/val_acc"} <= tags
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps] == list(range(6))
    assert [round(e.value, 5) for e in loss] == [round(r["loss"], 5) for r in steps]
    assert [e.step for e in acc.Scalars("epoch/val_acc")] == [1, 2]


def test_the_writer_is_imported_without_pytorch_and_pytorch_still_imports_after():
    """board._writer_class keeps tensorboardX from importing all of PyTorch (a second of start-up), in a fresh
    interpreter, and leaves `import torch` working afterwards where it is installed."""
    import subprocess
    import sys
    code = ("import sys, importlib.util; from dptrain import board; w = board._writer_class(); "
            "assert w is None or 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]; "
            "ok = importlib.util.find_spec('torch') is None or __import__('torch').zeros(2).sum().item() == 0; "
            "print('ok' if ok else 'broken')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
