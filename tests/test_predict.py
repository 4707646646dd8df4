"""`dptrain predict` against the evaluation path (load_folder_for_eval's decoded images, make_batch, the model in
eval mode) on the same images; every Pillow mode against its RGB conversion (16-bit greyscale against the 8-bit
image it was made from); a .tgz against its folder; corrupt files skipped, named and counted; the three output
formats parsed back."""
import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from trained import train_tiny

from dptrain import cli
from dptrain.data.augment import make_batch
from dptrain.data.dataset import load_folder_for_eval
from dptrain.data.decode import decode_image, to_rgb
from dptrain.inference.model_file import load_model
from dptrain.inference.predict import predict, softmax


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("predict"))


def _by_name(pred, prefix):
    """{path relative to prefix: (class indices, probabilities)}"""
    return {p[len(prefix):]: (ks, qs) for p, ks, qs in zip(pred.paths, pred.top_index, pred.top_prob)}


def test_matches_evaluation_path(trained, tmp_path):
    data, ckpt, cfg = trained
    model, _, class_names = load_model(ckpt)
    K = len(class_names)
    ds = load_folder_for_eval(data, class_names, cfg.data.image_size, cfg.data.center_crop,
                              cache_dir=str(tmp_path), progress=False)
    probs = softmax(model.forward(make_batch(ds.images, np.arange(len(ds.images))), train=False))
    pred = predict(ckpt, [data], top_k=K, batch_size=7, progress=False)  # a ragged last batch
    got = _by_name(pred, f"{data}/")
    assert sorted(got) == sorted(ds.names) and pred.skipped == []
    assert pred.top_k == K and pred.class_names == class_names
    for name, p in zip(ds.names, probs):
        ks, qs = got[name]
        assert ks[0] == p.argmax()
        np.testing.assert_allclose(qs, p[ks], rtol=0, atol=1e-6)
        assert sorted(ks) == list(range(K)) and abs(qs.sum() - 1) < 1e-9
        assert np.all(np.diff(qs) <= 0)  # most probable first
    assert (pred.top_index[:, 0] == np.array([class_names.index(p.split("/")[-2]) for p in pred.paths])).mean() > 2 / K
    top2 = predict(ckpt, [data], top_k=2, batch_size=64, progress=False)
    assert top2.top_index.shape == (len(ds.names), 2) and top2.paths == pred.paths
    np.testing.assert_array_equal(top2.top_index, pred.top_index[:, :2])
    assert predict(ckpt, [data], top_k=99, progress=False).top_k == K  # clamped to the number of classes


def _modes(rgb: Image.Image):
    """(file name, image to save, the RGB image it should decode like) for every mode Pillow reads from a file."""
    grey = rgb.convert("L")
    g16 = np.asarray(grey, np.uint16) * 257  # 16-bit greyscale whose 8-bit reading is `grey`
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    cases = [("grey.png", grey), ("grey_alpha.png", grey.convert("LA")), ("palette.png", pal),
             ("palette.gif", pal), ("rgba.png", rgba), ("rgba.webp", rgba), ("bilevel.png", grey.convert("1")),
             ("bilevel.bmp", grey.convert("1")), ("cmyk.jpg", rgb.convert("CMYK")), ("cmyk.tiff", rgb.convert("CMYK")),
             ("grey.pgm", grey), ("grey.jpg", grey), ("float.tiff", grey.convert("F"))]
    out = [(name, im, None) for name, im in cases]
    grey_rgb = grey.convert("RGB")
    out += [("grey16.png", Image.fromarray(g16), grey_rgb),  # opens as I;16
            ("grey16.tiff", Image.fromarray(g16), grey_rgb),
            ("grey16be.tiff", Image.frombytes("I;16B", rgb.size, g16.astype(">u2").tobytes()), grey_rgb),
            ("int32.tiff", Image.fromarray(g16.astype(np.int32), "I"), grey_rgb),
            ("grey16.pgm", Image.fromarray(g16), grey_rgb)]  # opens as I (Pillow reads 16-bit PGM so)
    return out


def test_every_mode_predicts_like_its_rgb_conversion(trained, tmp_path):
    data, ckpt, cfg = trained
    src = next((data / "Person_0002").glob("*.jpg"))
    rgb = Image.open(src).convert("RGB").resize((44, 38))  # not square: the centre crop is clamped to 38
    (tmp_path / "modes").mkdir()
    (tmp_path / "refs").mkdir()
    opened = {}
    for name, im, ref in _modes(rgb):
        im.save(tmp_path / "modes" / name)
        with Image.open(tmp_path / "modes" / name) as back:
            opened[name] = back.mode
            ref = back.convert("RGB") if ref is None else ref  # the RGB image the file holds
        ref.save(tmp_path / "refs" / (name + ".png"))
    assert {"1", "L", "LA", "P", "RGBA", "CMYK", "F", "I;16", "I;16B", "I"} <= set(opened.values()), opened
    pred = predict(ckpt, [tmp_path / "modes"], top_k=6, progress=False)
    refs = predict(ckpt, [tmp_path / "refs"], top_k=6, progress=False)
    assert pred.skipped == [] and len(pred.paths) == len(opened)
    got, want = _by_name(pred, f"{tmp_path}/modes/"), _by_name(refs, f"{tmp_path}/refs/")
    for name in opened:
        (ks, qs), (rk, rq) = got[name], want[name + ".png"]
        assert ks[0] == rk[0], (name, opened[name])
        np.testing.assert_allclose(qs[np.argsort(ks)], rq[np.argsort(rk)], atol=1e-6, err_msg=name)


def test_sixteen_bit_is_scaled_not_clipped():
    v = np.array([[0, 1, 128, 255]], np.uint16)
    for im in (Image.fromarray(v * 257), Image.fromarray((v * 257).astype(np.int32), "I")):
        np.testing.assert_array_equal(np.asarray(to_rgb(im))[..., 0], v.astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(buf, "PNG")
    assert np.all(decode_image(buf.getvalue(), 4) == 128)  # Pillow's own convert("RGB") gives 255


def _tgz(folder, dest, arcname):
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return dest


def test_tgz_folder_and_files_agree(trained, tmp_path):
    data, ckpt, _ = trained
    archive = _tgz(data, tmp_path / "set.tgz", "set")
    folder = predict(ckpt, [data], progress=False)
    packed = predict(ckpt, [archive], progress=False)
    assert [p.split(":", 1)[0] for p in packed.paths] == [str(archive)] * len(folder.paths)
    assert [p.split(":set/", 1)[1] for p in packed.paths] == [p[len(f"{data}/"):] for p in folder.paths]
    np.testing.assert_array_equal(packed.top_index, folder.top_index)
    np.testing.assert_allclose(packed.top_prob, folder.top_prob, atol=1e-9)
    # loose files and an archive mixed: input order kept, each file predicted as in the folder
    one = sorted((data / "Person_0003").glob("*.jpg"))[:2]
    mixed = predict(ckpt, [one[1], archive, one[0]], progress=False)
    assert mixed.paths[0] == str(one[1]) and mixed.paths[-1] == str(one[0])
    assert len(mixed.paths) == len(folder.paths) + 2
    row = folder.paths.index(str(one[1]))
    np.testing.assert_array_equal(mixed.top_index[0], folder.top_index[row])


def test_corrupt_files_are_skipped_named_and_counted(trained, tmp_path, caplog):
    data, ckpt, _ = trained
    good = sorted((data / "Person_0001").glob("*.jpg"))[:3]
    folder = tmp_path / "in"
    (folder / "deep" / "er").mkdir(parents=True)
    for i, f in enumerate(good):
        (folder / "deep" / "er" / f"ok{i}.jpg").write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:80])  # truncated
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not an image extension: not tried")
    (folder / ".hidden.jpg").write_bytes(b"x")
    named = tmp_path / "garbage.dat"  # named explicitly: tried whatever its extension
    named.write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        pred = predict(ckpt, [folder, named], progress=False)
    assert sorted(os.path.basename(p) for p in pred.paths) == ["ok0.jpg", "ok1.jpg", "ok2.jpg"]
    assert sorted(os.path.basename(p) for p, _ in pred.skipped) == ["broken.jpg", "empty.png", "garbage.dat"]
    assert all(why for _, why in pred.skipped)
    assert "skipped 3 unreadable" in caplog.text and "broken.jpg" in caplog.text
    d = pred.to_dict()
    assert d["num_skipped"] == 3 and {s["path"] for s in d["skipped"]} == {p for p, _ in pred.skipped}


def test_output_formats_parse(trained, capsys):
    data, ckpt, _ = trained
    files = sorted((data / "Person_0004").glob("*.jpg"))[:4]
    args = ["predict", "--checkpoint", str(ckpt), *map(str, files), "--top-k", "3", "--batch-size", "3"]
    ref = predict(ckpt, files, top_k=3, batch_size=3, progress=False)
    names = ref.class_names

    assert cli.main(args + ["--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in d["predictions"]] == list(map(str, files)) and d["skipped"] == []
    assert d["num_images"] == 4 and d["top_k"] == 3
    assert [[t["class"] for t in p["top"]] for p in d["predictions"]] == [[names[k] for k in r]
                                                                         for r in ref.top_index]

    assert cli.main(args + ["--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == list(map(str, files))
    assert [float(r["prob_1"]) for r in rows] == ref.top_prob[:, 0].tolist()  # repr round-trips
    assert [r["class_3"] for r in rows] == [names[k] for k in ref.top_index[:, 2]]

    assert cli.main(args) == 0  # table by default
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "#1", "#2", "#3"] and len(lines) == 5
    for line, f, ks, qs in zip(lines[1:], files, ref.top_index, ref.top_prob):
        cells = line.split()
        assert cells[0] == str(f) and cells[1::2] == [names[k] for k in ks]
        assert [float(c) for c in cells[2::2]] == [round(q, 3) for q in qs]


def test_cli_errors(trained, tmp_path, capsys):
    data, ckpt, _ = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert cli.main(["predict", "--checkpoint", str(ckpt), str(bad), "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_skipped"] == 1 and "none of the 1 image" in captured.err
    with pytest.raises(SystemExit, match="no such file or folder: .*missing"):
        cli.main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="nothing.npz"):
        cli.main(["predict", "--checkpoint", str(tmp_path / "nothing.npz"), str(bad)])
    (tmp_path / "void").mkdir()
    with pytest.raises(SystemExit, match="no image files"):
        cli.main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "void")])
    (tmp_path / "bad.tgz").write_bytes(b"not gzip")
    with pytest.raises(SystemExit, match="cannot read archive"):
        cli.main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "bad.tgz")])
    with pytest.raises(SystemExit, match="top_k"):
        cli.main(["predict", "--checkpoint", str(ckpt), str(data), "--top-k", "0"])
