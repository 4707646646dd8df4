"""What a dataset folder or archive may hold besides images, against real files, Pillow and `dptrain train`.

Each case plants the hostile thing beside the session's synthetic images and checks the loader (data/guard.py) skips
it, names it with the reason and counts it, without doing what made it dangerous: a FIFO is never opened (train
would block on it forever: the run has a hard timeout), an EPS named .jpg never reaches Pillow's EPS plugin (the
control shows Pillow would pick it), an 80-megapixel PNG is never decoded (Pillow's load is counted), an oversized
.tgz member is never extracted (extractfile is counted). Then the run folder: config.toml is replaced, never
rewritten in place (a hard link to the old one keeps the old text), a resume reading a damaged one stops in one line
naming it, and `--resume auto` falls back to the newest readable step-N.npz when last.npz is damaged."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from distutil import cli_args, tiny_cfg
from PIL import EpsImagePlugin, Image, ImageFile

from dptrain.data import decode, guard
from dptrain.data.discover import discover

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
       b"%%EOF\n")


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the session's 8-class set (32x32 JPEGs), to plant files in."""
    return Path(shutil.copytree(tiny_data, tmp_path / "synth"))


def _first_class(data: Path) -> Path:
    return sorted(p for p in data.iterdir() if p.is_dir())[0]


def _skipped(decoded) -> dict:
    return {name.rsplit("/", 1)[-1]: why for name, why in decoded.skipped}


def _big_png(path: Path, width: int, height: int) -> None:
    """A greyscale PNG of width x height zero pixels, written chunk by chunk (a few hundred kB on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.timeout(180)
def test_a_fifo_socket_and_device_in_a_class_folder_are_skipped_unopened_and_train_ends(data, tmp_path):
    cls = _first_class(data)
    os.mkfifo(cls / "pipe.jpg")  # no writer ever comes: opening it for reading would block
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(cls / "sock.png"))
    (cls / "zero.jpg").symlink_to("/dev/zero")
    try:
        r = subprocess.run([sys.executable, "-m", "dptrain", "train",
                            *cli_args(data, tmp_path / "run", train__epochs=1, train__steps_per_epoch=2)],
                           capture_output=True, text=True, timeout=150)  # a hang is a TimeoutExpired, and killed
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["num_skipped"] == 3, r.stdout
    warning = next(line for line in r.stderr.splitlines() if "skipped 3 unreadable or refused" in line)
    assert f"{cls.name}/pipe.jpg (refused: a FIFO, not a regular file; never opened)" in warning, warning
    assert f"{cls.name}/sock.png (refused: a socket, not a regular file; never opened)" in warning, warning
    assert f"{cls.name}/zero.jpg (refused: a character device, not a regular file; never opened)" in warning, warning


def test_an_eps_named_jpg_is_refused_without_reaching_a_non_raster_decoder(data, monkeypatch):
    cls = _first_class(data)
    (cls / "drawing.jpg").write_bytes(EPS)
    with Image.open(cls / "drawing.jpg") as im:  # control: left to choose, Pillow takes it for EPS (Ghostscript)
        assert im.format == "EPS"
    seen = []

    def eps_open(self):
        seen.append(self.fp)
        raise AssertionError("the EPS plugin was asked to open a training file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
    decoded = decode.decode_entries(discover(data), 16, workers=1, progress=False)
    why = _skipped(decoded)["drawing.jpg"]
    assert why == "refused: not a JPEG/PNG/BMP/PPM/GIF/WEBP image (other formats, e.g. EPS or PDF, are never decoded)"
    assert not seen and len(decoded.names) == len(discover(data).entries) - 1


def test_an_over_limit_png_is_skipped_and_named_without_being_decoded(data, monkeypatch):
    """80 MP (10000 x 8000): 240 MB as RGB. Pillow's load() is where pixels are decoded; it must run for the
    ordinary images and never for this one. A 36 MP JPEG stays: decoded at its DCT draft's scale (750 x 750)."""
    cls = _first_class(data)
    _big_png(cls / "huge.png", 10000, 8000)
    Image.new("L", (6000, 6000), 128).save(cls / "camera.jpg", quality=50)
    loaded = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    decoded = decode.decode_entries(discover(data), 16, workers=1, progress=False)
    skipped = _skipped(decoded)
    assert skipped == {"huge.png": "refused: 10000x8000 pixels (80.0 MP decoded) over data.max_image_pixels = "
                                   "32,000,000; not decoded"}, skipped
    assert (10000, 8000) not in loaded and (750, 750) in loaded, sorted(set(loaded))
    assert f"{cls.name}/camera.jpg" in decoded.names
    # the limit is the config key's: a lower one refuses the camera JPEG too, at its decoded size
    low = guard.Limits(max_pixels=500_000)
    with pytest.raises(guard.Refused, match=r"6000x6000 pixels \(0.6 MP decoded\) over data.max_image_pixels"):
        decode.decode_image(cls / "camera.jpg", 16, limits=low)


def test_an_over_limit_tgz_member_is_skipped_and_named_without_being_read(data, tmp_path, monkeypatch):
    """A .tgz is read member by member into memory: a 65 MB member (over data.max_file_mb = 64) must be skipped from
    its header's size, never extracted."""
    archive = tmp_path / "set.tgz"
    cls = _first_class(data)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        tf.add(data, arcname="synth")
        info = tarfile.TarInfo(f"synth/{cls.name}/big.jpg")
        info.size = 65 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    extracted = []
    real_extract = tarfile.TarFile.extractfile

    def counting_extract(self, member):
        extracted.append(member.name)
        return real_extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting_extract)
    found = discover(archive)
    decoded = decode.decode_entries(found, 16, workers=1, progress=False)
    assert _skipped(decoded) == {"big.jpg": "refused: member of 65.0 MB is over data.max_file_mb = 64; not read"}
    assert f"synth/{cls.name}/big.jpg" not in extracted and len(extracted) == len(found.entries) - 1
    assert len(decoded.names) == len(found.entries) - 1


def test_config_toml_is_replaced_never_rewritten_in_place(tiny_data, tmp_path):
    """A hard link to the run's old config.toml sees a rewrite in place (the same inode); an atomic replace leaves it
    the old text and gives config.toml a new inode, so a crash or a full disk mid-write cannot truncate it."""
    from dptrain.train import run_local
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("# the previous run's\n")
    os.link(out / "config.toml", tmp_path / "old.toml")
    run_local(tiny_cfg(tiny_data, out, train__epochs=1, train__steps_per_epoch=1))
    assert (tmp_path / "old.toml").read_text() == "# the previous run's\n"
    assert os.stat(out / "config.toml").st_ino != os.stat(tmp_path / "old.toml").st_ino
    assert "[train]" in (out / "config.toml").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".config.toml")]  # no temp file left


def test_a_resume_reading_a_damaged_config_toml_stops_in_one_line_naming_it(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("[train]\nepochs = 3\nlr = 0.")  # cut off mid-value
    r = subprocess.run([sys.executable, "-m", "dptrain", "train", "--resume", "--out", str(out), "--data",
                        str(tiny_data)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"dptrain: config error: {out / 'config.toml'}: not a readable TOML config ("), r.stderr


@pytest.mark.timeout(240)
def test_resume_auto_falls_back_to_the_newest_readable_step_checkpoint(tiny_data, tmp_path):
    """last.npz and the newest step file (step-10: often the same file, a hard link) damaged: the newest readable
    one is step-8."""
    from dptrain.train import run_local
    out = tmp_path / "run"
    run_local(tiny_cfg(tiny_data, out, train__epochs=2, train__checkpoint_every_steps=2, train__keep_checkpoints=3))
    assert sorted(p.name for p in out.glob("step-*.npz"))[-1] == "step-00000010.npz"
    for name in ("last.npz", "step-00000010.npz"):
        with open(out / name, "r+b") as f:
            f.truncate(1000)
    args = cli_args(tiny_data, out, train__epochs=3, train__checkpoint_every_steps=2, train__keep_checkpoints=3)
    strict = subprocess.run([sys.executable, "-m", "dptrain", "train", "--resume", *args], capture_output=True,
                            text=True, timeout=120)
    assert strict.returncode == 1 and strict.stderr.strip().splitlines()[-1].startswith(
        f"dptrain train: {out / 'last.npz'}: not a dptrain checkpoint"), strict.stderr
    r = subprocess.run([sys.executable, "-m", "dptrain", "train", "--resume", "auto", *args], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "--resume auto:" in line]
    assert len(said) == 1, r.stderr
    assert f"{out / 'last.npz'}: not a dptrain checkpoint" in said[0], said[0]
    assert said[0].endswith("resuming from step-00000008.npz, the newest readable checkpoint (step 8)"), said[0]
    assert "resumed from " + str(out / "step-00000008.npz") in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["epoch"] == 3


@pytest.mark.timeout(240)
def test_predict_refuses_the_same_files_by_the_same_code(tmp_path):
    """predict reads folders, loose files and archives with training's guard: a FIFO in a folder and one named on
    the command line, an EPS named .jpg and an over-limit PNG are skipped with their reasons, the images predicted
    (in a child process with a hard timeout: a FIFO opened would block it)."""
    from trained import train_tiny
    data, ckpt, _ = train_tiny(tmp_path / "t")
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next((data / _first_class(data).name).glob("*.jpg")), loose / "ok.jpg")
    os.mkfifo(loose / "pipe.jpg")
    os.mkfifo(tmp_path / "named.jpg")
    (loose / "drawing.jpg").write_bytes(EPS)
    _big_png(loose / "huge.png", 10000, 8000)
    r = subprocess.run([sys.executable, "-m", "dptrain", "predict", "--checkpoint", str(ckpt), "--format", "json",
                        str(loose), str(tmp_path / "named.jpg")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p.rsplit("/", 1)[-1] for p in (x["path"] for x in out["predictions"])] == ["ok.jpg"]
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in out["skipped"]}
    assert reasons == {
        "pipe.jpg": "refused: a FIFO, not a regular file; never opened",
        "named.jpg": "refused: a FIFO, not a regular file; never opened",
        "drawing.jpg": "refused: not a JPEG/PNG/BMP/PPM/GIF/WEBP/TIFF image (other formats, e.g. EPS or PDF, are "
                       "never decoded)",
        "huge.png": "refused: 10000x8000 pixels (80.0 MP decoded) over data.max_image_pixels = 32,000,000; "
                    "not decoded"}, reasons
