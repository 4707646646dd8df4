"""evaluate_checkpoint against the Trainer's own evaluation of the same checkpoint on the same images (accuracy and
loss), against hand counts for the per-class table, and against a folder we salted with an unknown class and a
corrupt JPEG (both must be reported, neither counted)."""
import shutil

import numpy as np
import pytest
from helpers import make_config

from dptrain import checkpoint
from dptrain.compute import evaluate_batches
from dptrain.data import synth
from dptrain.inference.evaluate import evaluate_checkpoint
from dptrain.inference.model_file import load_model
from dptrain.train import prepare, run_local


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    synth.generate(root / "set", num_classes=6, seed=2, image_size=32, num_rich=6, max_images=24, min_rich=14,
                   progress=False)
    cfg = make_config({"data.path": root / "set", "data.image_size": 32, "data.min_images_per_class": 10,
                       "data.cache_dir": root / "cache", "model.widths": [8, 16], "model.res_width": 16,
                       "model.hidden": 32, "train.epochs": 3, "train.batch_size": 16, "train.out": root / "run",
                       "train.progress": False})
    run_local(cfg)
    return root, cfg


def test_matches_trainer_evaluation(run):
    root, cfg = run
    ckpt = root / "run" / "best.npz"
    res = evaluate_checkpoint(ckpt, root / "set", batch_size=7)  # a batch size that leaves a ragged last batch
    tr = prepare(cfg, resume=False)
    tr.restore(ckpt)
    everything = np.arange(len(tr.ds.images))
    loss_sum, correct, _ = evaluate_batches(tr.model, tr.ds.images, tr.ds.labels, everything, 64)
    assert res["num_images"] == len(everything) and res["correct"] == correct
    assert res["accuracy"] == correct / len(everything)
    assert res["loss"] == pytest.approx(loss_sum / len(everything), rel=1e-5)
    assert res["unknown_classes"] == [] and res["skipped"] == []
    assert res["num_classes_model"] == 6 and res["chance"] == pytest.approx(1 / 6)
    counts = np.bincount(tr.ds.labels, minlength=6)
    assert {k: v["images"] for k, v in res["per_class"].items()} == dict(zip(tr.ds.class_names, counts.tolist()))
    assert sum(v["correct"] for v in res["per_class"].values()) == correct
    assert res["accuracy"] > 2 / 6  # trained, so clearly above chance on (mostly) its own training images


def test_unknown_class_and_corrupt_image_are_reported(run):
    root, cfg = run
    salted = root / "salted"
    shutil.copytree(root / "set", salted)
    known = sorted(p.name for p in (root / "set").iterdir() if p.is_dir())
    donor = next((salted / known[0]).glob("*.jpg"))
    (salted / "Zed_Stranger").mkdir()
    shutil.copy(donor, salted / "Zed_Stranger" / "Zed_Stranger_0001.jpg")
    shutil.copy(donor, salted / "Zed_Stranger" / "Zed_Stranger_0002.jpg")
    (salted / known[1] / "broken.jpg").write_bytes(donor.read_bytes()[:60])  # a truncated JPEG
    clean = evaluate_checkpoint(root / "run" / "best.npz", root / "set")
    res = evaluate_checkpoint(root / "run" / "best.npz", salted)
    assert res["unknown_classes"] == ["Zed_Stranger"]
    assert any(s.endswith("broken.jpg") and known[1] in s for s in res["skipped"]), res["skipped"]
    for k in ("num_images", "correct", "accuracy", "per_class"):  # neither the stranger nor the broken file counts
        assert res[k] == clean[k], k
    assert "Zed_Stranger" not in res["per_class"]


def test_subset_of_classes_and_errors(run, tmp_path):
    root, cfg = run
    one = tmp_path / "one"
    name = sorted(p.name for p in (root / "set").iterdir() if p.is_dir())[2]
    shutil.copytree(root / "set" / name, one / name)
    res = evaluate_checkpoint(root / "run" / "last.npz", one)
    assert list(res["per_class"]) == [name] and res["num_classes_seen"] == 1
    assert res["per_class"][name]["correct"] == res["correct"]

    strangers = tmp_path / "strangers"
    shutil.copytree(root / "set" / name, strangers / "Nobody_Known")
    with pytest.raises(ValueError, match="classes"):
        evaluate_checkpoint(root / "run" / "last.npz", strangers)
    with pytest.raises(checkpoint.CheckpointError, match="missing.npz"):
        evaluate_checkpoint(tmp_path / "missing.npz", one)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_checkpoint(root / "run" / "last.npz", one, batch_size=0)


def test_load_model_rejects_mismatched_arrays(run, tmp_path):
    root, cfg = run
    arrays, meta = checkpoint.load(root / "run" / "last.npz")
    bad = tmp_path / "bad.npz"
    checkpoint.save(bad, params=arrays["params"][:-1], velocity=arrays["velocity"], buffers=arrays["buffers"],
                    meta={k: v for k, v in meta.items() if k != "format_version"})
    with pytest.raises(checkpoint.CheckpointError, match="bad.npz"):
        load_model(bad)
