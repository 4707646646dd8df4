"""The synthetic set against LFW's shape: the layout Person_XXXX/Person_XXXX_NNNN.jpg, a long tail of
images per identity, byte-identical output for a seed (also with a process pool), and readable by discovery."""
import json

import numpy as np

from dptrain.data import discover, synth


def test_layout_long_tail_and_determinism(tmp_path):
    kw = dict(num_classes=30, seed=3, image_size=32, num_rich=5, max_images=20, min_rich=6, progress=False)
    s1 = synth.generate(tmp_path / "a", **kw)
    s2 = synth.generate(tmp_path / "b", workers=2, **kw)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert files_a == files_b and len(files_a) == s1["num_images"] == s2["num_images"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert str(files_a[0]) == "Person_0001/Person_0001_0001.jpg" or files_a[0].parts[0].startswith("Person_")
    counts = np.array(list(s1["counts"].values()))
    assert counts.max() == 20 and (counts >= 6).sum() >= 5 and (counts == 1).sum() >= 8  # head and singletons
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["num_images"] == s1["num_images"]
    assert (tmp_path / "a" / "README.txt").exists()
    found = discover.discover(tmp_path / "a")
    assert len(found.entries) == s1["num_images"] and len(found.class_names) == 30
    s3 = synth.generate(tmp_path / "c", **dict(kw, seed=4))
    assert s3["counts"] != s1["counts"] or (tmp_path / "c" / files_a[0]).read_bytes() != (
        tmp_path / "a" / files_a[0]).read_bytes()


def test_default_counts_are_lfw_like():
    counts = synth.image_counts(400, 80, 150, 10, seed=0)
    assert 2000 <= counts.sum() <= 4000
    assert (counts >= 10).sum() == 80 and counts.max() == 150
    assert 0.4 < (counts == 1).mean() < 0.7  # LFW: 4069 of 5749 identities have a single image


def test_identities_differ_and_images_vary():
    a1 = np.asarray(synth.render(0, 1, 1, 32), np.float32)
    a2 = np.asarray(synth.render(0, 1, 2, 32), np.float32)
    assert np.array_equal(a1, np.asarray(synth.render(0, 1, 1, 32), np.float32))
    assert np.abs(a1 - a2).mean() > 5  # pose, light, background change
    assert synth.identity(0, 1)["face_w"] != synth.identity(0, 2)["face_w"]
    assert np.array_equal(synth.identity(0, 1)["skin"], synth.identity(0, 1)["skin"])
