"""The decode cache, compared against decoding afresh: the second load must not decode and must give the same
arrays; the cache files appear by atomic rename only."""
import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from dptrain.config import DataConfig
from dptrain.data import cache, dataset, decode


def _write(root, layout):
    for c, (cls, n) in enumerate(sorted(layout.items())):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (30, 30), (40 * c, 10 * i, 99)).save(root / cls / f"{cls}_{i:04d}.jpg")


def test_second_load_uses_cache_and_does_not_decode(tmp_path, monkeypatch):
    _write(tmp_path / "d", {"A": 4, "B": 3, "C": 1})
    cfg = DataConfig(path=str(tmp_path / "d"), image_size=16, cache_dir=str(tmp_path / "cache"),
                     min_images_per_class=2)
    first = dataset.load_dataset(cfg, seed=0, progress=False)
    assert not first.from_cache and first.counts["num_classes"] == 2
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp files left

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "decode_entries", boom)
    second = dataset.load_dataset(cfg, seed=0, progress=False)
    assert second.from_cache
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    # different preprocessing is a different key: it must decode
    with pytest.raises(AssertionError, match="decoded again"):
        dataset.load_dataset(dataclasses.replace(cfg, image_size=8), seed=0, progress=False)


def test_env_var_sets_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path / "envcache"))
    assert cache.resolve_cache_dir("") == tmp_path / "envcache"
    assert cache.resolve_cache_dir(str(tmp_path / "x")) == tmp_path / "x"


def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    d = decode.Decoded(np.ones((2, 4, 4, 3), np.uint8), ["A/a.jpg", "A/b.jpg"])

    def failing_save(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save(tmp_path, "k", d, {})
    assert os.listdir(tmp_path) == []  # the temp file was removed, nothing under the final name
    monkeypatch.undo()
    cache.save(tmp_path, "k", d, {})
    got = cache.load(tmp_path, "k")
    assert got.from_cache and np.array_equal(got.images, d.images) and got.names == d.names
    # a .npy replaced by something inconsistent is ignored, not trusted
    np.save(tmp_path / "k.npy", np.zeros((3, 4, 4, 3), np.uint8))
    assert cache.load(tmp_path, "k") is None
