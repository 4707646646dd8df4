"""Class filtering and the stratified split, checked against their stated invariants over random class sizes
(hypothesis): every class in training, validation only from classes with >= 2 images, disjoint, covering,
deterministic for a seed."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dptrain.config import DataConfig
from dptrain.data import split
from dptrain.data.dataset import load_dataset


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=25), vf=st.floats(0.0, 0.9), seed=st.integers(0, 99))
def test_split_invariants(sizes, vf, seed):
    names = [f"c{i:02d}" for i in range(len(sizes))]
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(len(labels))]  # class members interleaved
    tr, va = split.stratified_split(labels, names, vf, seed)
    assert tr.dtype == va.dtype == np.int64
    assert not np.intersect1d(tr, va).size and np.array_equal(np.sort(np.concatenate([tr, va])),
                                                              np.arange(len(labels)))
    for c, n in enumerate(sizes):
        n_val = int((labels[va] == c).sum())
        assert (labels[tr] == c).sum() >= 1
        assert n_val == split.num_val(n, vf)
        if n == 1 or vf <= 0:
            assert n_val == 0
        else:
            assert 1 <= n_val <= n - 1 and n_val == min(max(int(np.floor(vf * n + 0.5)), 1), n - 1)
    tr2, va2 = split.stratified_split(labels, names, vf, seed)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)


def test_split_depends_on_seed_and_not_on_other_classes():
    labels = np.repeat(np.arange(3), 20)
    _, v0 = split.stratified_split(labels, ["a", "b", "c"], 0.25, 0)
    _, v1 = split.stratified_split(labels, ["a", "b", "c"], 0.25, 1)
    assert not np.array_equal(v0, v1)
    # dropping class "c" leaves the choice for "a" and "b" unchanged
    _, v2 = split.stratified_split(labels[:40], ["a", "b"], 0.25, 0)
    assert np.array_equal(v0[v0 < 40], v2)


def test_select_classes_min_and_max_with_name_ties():
    per_image = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 1 + ["e"] * 3
    assert split.select_classes(per_image, 2) == ["a", "b", "c", "e"]
    assert split.select_classes(per_image, 2, max_classes=2) == ["a", "b"]  # b beats c, e on name
    assert split.select_classes(per_image, 6) == []
    assert "1 with 1 image" in split.describe_counts(per_image)


def test_no_class_survives_message_names_path_and_counts(tmp_path):
    from PIL import Image
    for c in "AB":
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    cfg = DataConfig(path=str(tmp_path), image_size=8, cache_dir=str(tmp_path / ".cache"), min_images_per_class=3)
    with pytest.raises(ValueError, match=r"(?s)>= 3.*2 classes: 2 with 1 image") as e:
        load_dataset(cfg, 0, progress=False)
    assert str(tmp_path) in str(e.value)
