"""Discovery and decoding, compared against the files we wrote: a folder and its .tgz (with LFW's extra top-level
folder) must give the same entries and the same pixels; broken files are skipped and named, never fatal."""
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from dptrain.data import decode, discover


def _write(root, layout, size=40):
    """layout: {class: n_images}; distinct solid colours so decoded pixels are checkable."""
    for c, (cls, n) in enumerate(sorted(layout.items())):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (10 * c, 20 * i, 200)).save(root / cls / f"{cls}_{i + 1:04d}.png")


def _tgz(src_parent, top, dest):
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src_parent / top, arcname=top)
    return dest


def test_folder_and_tgz_with_extra_top_folder_agree(tmp_path):
    root = tmp_path / "lfw"
    _write(root, {"Alice": 3, "Bob": 1, "Carol": 2})
    (root / "Alice" / "notes.txt").write_text("not an image")
    (root / "Alice" / ".hidden.jpg").write_bytes(b"x")
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"x")
    (root / "README.jpg").write_bytes(b"x")  # in the root: no class
    Image.new("RGB", (8, 8)).save(root / "Bob" / "UPPER.JPG", "JPEG")
    a = discover.discover(root)
    b = discover.discover(_tgz(tmp_path, "lfw", tmp_path / "lfw.tgz"))
    names = [e.name for e in a.entries]
    assert names == ["Alice/Alice_0001.png", "Alice/Alice_0002.png", "Alice/Alice_0003.png",
                     "Bob/Bob_0001.png", "Bob/UPPER.JPG", "Carol/Carol_0001.png", "Carol/Carol_0002.png"]
    assert [e.name for e in b.entries] == names
    assert a.class_names == b.class_names == ["Alice", "Bob", "Carol"]
    assert a.kind == "dir" and b.kind == "tar"
    da = decode.decode_entries(a, 16, workers=1, progress=False)
    db = decode.decode_entries(b, 16, workers=2, progress=False)
    assert da.names == db.names and np.array_equal(da.images, db.images)
    assert da.images.shape == (7, 16, 16, 3) and da.images.dtype == np.uint8
    assert tuple(da.images[0, 5, 5]) == (0, 0, 200)


def test_fingerprint_changes_with_files_and_is_stable(tmp_path):
    _write(tmp_path / "d", {"A": 2, "B": 2})
    f1 = discover.discover(tmp_path / "d").fingerprint
    assert discover.discover(tmp_path / "d").fingerprint == f1
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "B" / "B_0003.png")
    assert discover.discover(tmp_path / "d").fingerprint != f1


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        discover.discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        discover.discover(tmp_path / "empty")


def test_broken_files_skipped_and_named_in_one_warning(tmp_path, caplog):
    root = tmp_path / "d"
    _write(root, {"A": 2, "B": 2})
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "A" / "full.jpg", quality=90)
    data = (root / "A" / "full.jpg").read_bytes()
    (root / "A" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "A" / "empty.jpg").write_bytes(b"")
    (root / "B" / "text.png").write_bytes(b"this is not a png at all")
    (root / "B" / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    found = discover.discover(root)
    with caplog.at_level(logging.WARNING):
        d = decode.decode_entries(found, 16, workers=1, progress=False)
        decode.warn_skipped(d.skipped, str(root))
    bad = {"A/truncated.jpg", "A/empty.jpg", "B/text.png", "B/garbage.jpg"}
    assert {nm for nm, _ in d.skipped} == bad
    assert len(d.names) == 5 and not bad & set(d.names) and len(d.images) == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4" in warnings[0].getMessage()
    assert all(nm in warnings[0].getMessage() for nm in bad)


def test_center_crop_takes_the_middle(tmp_path):
    img = np.zeros((100, 100, 3), np.uint8)
    img[25:75, 25:75] = 255  # white centre square of 50 px
    (tmp_path / "A").mkdir()
    Image.fromarray(img).save(tmp_path / "A" / "a.png")
    full = decode.decode_image(tmp_path / "A" / "a.png", 20)
    crop = decode.decode_image(tmp_path / "A" / "a.png", 20, center_crop=50)
    assert crop[1:-1, 1:-1].min() == 255  # white (the border row blends in context outside the box)
    assert full[0, 0].max() == 0 and full[10, 10].min() == 255


def test_odd_members_do_not_turn_an_archive_into_one_class(tmp_path, caplog):
    """lfw/Alice/..., lfw/Bob/... plus an absolute-path member, a '..' member and a stray image beside lfw/: the
    classes are Alice and Bob; the odd members are ignored, counted and named (the refused ones never read)."""
    root = tmp_path / "lfw"
    _write(root, {"Alice": 4, "Bob": 4})
    stray = tmp_path / "stray.png"
    Image.new("RGB", (8, 8)).save(stray)
    dest = tmp_path / "odd.tgz"
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(root, arcname="lfw")
        for name in ("/abs/evil.png", "../up.png", "other/x.png"):
            info = tf.gettarinfo(str(stray), arcname="x")
            info.name = name  # tarfile keeps a leading '/' and '..' as given
            with open(stray, "rb") as f:
                tf.addfile(info, f)
    with caplog.at_level(logging.WARNING, logger="dptrain.data.discover"):
        found = discover.discover(dest)
    assert found.class_names == ["Alice", "Bob"]
    assert sorted(found.unsafe) == ["../up.png", "/abs/evil.png"]
    assert found.outside == ["other/x.png"]
    text = caplog.text
    assert "ignored 2 members with an absolute path or '..'" in text and "/abs/evil.png" in text
    assert "ignored 1 images outside lfw/: other/x.png" in text


def test_training_refuses_a_single_class(tmp_path):
    from dptrain import train
    from dptrain.config import Config
    _write(tmp_path / "one", {"Alice": 12})
    cfg = Config()
    cfg.data.path, cfg.data.image_size, cfg.data.cache_dir = str(tmp_path / "one"), 16, str(tmp_path / "cache")
    cfg.data.min_images_per_class = 2
    with pytest.raises(SystemExit, match="at least two classes; found 1 \\(Alice\\)"):
        train.prepare_or_exit(cfg, False, "train")
