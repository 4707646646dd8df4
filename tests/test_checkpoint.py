"""Checkpoints against what was saved: arrays bitwise (values and dtype) and meta equal after a round trip; a crash
in the middle of a write leaves the previous file byte-identical and no temp file; loading never unpickles; a
truncated, bit-flipped, foreign or missing file raises CheckpointError naming the path."""
import os

import numpy as np
import pytest

from dptrain import checkpoint
from dptrain.checkpoint import CheckpointError


def _state(seed=0, n=1000):
    rng = np.random.default_rng(seed)
    return dict(params=rng.standard_normal(n).astype(np.float32),
                velocity=rng.standard_normal(n).astype(np.float32),
                buffers=rng.standard_normal(17).astype(np.float32),
                meta={"step": 12 + seed, "class_names": ["a", "b", "Ünïcode"], "best_val_acc": 0.25,
                      "epoch_sums": [1.5, 3, 4, 0.125], "config": {"train": {"lr": 0.05}}})


def test_round_trip_is_exact(tmp_path):
    s = _state()
    path = tmp_path / "sub" / "last.npz"  # the folder is created
    checkpoint.save(path, **s)
    arrays, meta = checkpoint.load(path)
    for k in ("params", "velocity", "buffers"):
        assert arrays[k].dtype == s[k].dtype and arrays[k].shape == s[k].shape
        assert np.array_equal(arrays[k].view(np.uint32), s[k].view(np.uint32)), k  # bitwise, NaN-proof
    assert meta.pop("format_version") == checkpoint.FORMAT_VERSION
    assert meta == s["meta"]
    assert sorted(os.listdir(path.parent)) == ["last.npz"]  # no temp file left behind


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "last.npz"
    checkpoint.save(path, **_state(0))
    checkpoint.save(path, **_state(1))
    arrays, meta = checkpoint.load(path)
    assert meta["step"] == 13 and np.array_equal(arrays["params"], _state(1)["params"])


@pytest.mark.parametrize("when", ["during_write", "before_rename"])
def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch, when):
    path = tmp_path / "last.npz"
    checkpoint.save(path, **_state(0))
    before = path.read_bytes()
    real_savez = np.savez

    def savez_then_crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temp file first
        raise OSError("disk full")

    def crash_on_replace(src, dst):
        raise KeyboardInterrupt  # BaseException too: Ctrl-C at the worst moment

    if when == "during_write":
        monkeypatch.setattr(np, "savez", savez_then_crash)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.save(path, **_state(1))
    else:
        monkeypatch.setattr(os, "replace", crash_on_replace)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(path, **_state(1))
    monkeypatch.setattr(np, "savez", real_savez)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]
    assert checkpoint.load(path)[1]["step"] == 12


def test_load_never_unpickles(tmp_path):
    """An npz whose arrays are pickled objects must be refused, not executed: the payload would create a folder."""
    canary = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(canary),))

    evil = np.empty(1, dtype=object)
    evil[0] = Payload()
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        np.savez(f, params=evil, velocity=evil, buffers=evil, meta=evil)  # savez pickles object arrays
    with pytest.raises(CheckpointError, match="evil.npz"):
        checkpoint.load(path)
    assert not canary.exists()


def _corrupt(path, how):
    b = bytearray(path.read_bytes())
    if how == "truncated":
        return bytes(b[:len(b) // 2])
    if how == "truncated_tail":
        return bytes(b[:-10])
    if how == "bitflip":  # inside the params member: the zip CRC catches it
        b[200] ^= 0xFF
        return bytes(b)
    if how == "garbage":
        return os.urandom(len(b))
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "truncated_tail", "bitflip", "garbage", "empty"])
def test_corrupt_file_names_the_path(tmp_path, how):
    good = tmp_path / "good.npz"
    checkpoint.save(good, **_state())
    bad = tmp_path / f"bad_{how}.npz"
    bad.write_bytes(_corrupt(good, how))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(bad)
    assert str(bad) in str(e.value)


def test_missing_file_and_foreign_npz(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.npz"):
        checkpoint.load(tmp_path / "nothere.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))  # a valid npz, but not ours
    with pytest.raises(CheckpointError, match="foreign.npz"):
        checkpoint.load(foreign)
    wrong_version = tmp_path / "v0.npz"
    meta = np.frombuffer(b'{"format_version": 0}', np.uint8)
    np.savez(wrong_version, params=np.zeros(1), velocity=np.zeros(1), buffers=np.zeros(1), meta=meta)
    with pytest.raises(CheckpointError, match="v0.npz"):
        checkpoint.load(wrong_version)
    bad_json = tmp_path / "badjson.npz"
    np.savez(bad_json, params=np.zeros(1), velocity=np.zeros(1), buffers=np.zeros(1),
             meta=np.frombuffer(b"\xff{not json", np.uint8))
    with pytest.raises(CheckpointError, match="badjson.npz"):
        checkpoint.load(bad_json)


def test_keep_checkpoints_keeps_the_last_k_step_files(tiny_data, tmp_path):
    """--checkpoint-every 2 --keep-checkpoints 2 over 10 steps: step-8 and step-10 remain, equal to what last.npz
    was then (the newest equals last.npz), each loadable."""
    from distutil import tiny_cfg

    from dptrain.train import run_local
    run_local(tiny_cfg(tiny_data, tmp_path / "run", train__epochs=2, train__checkpoint_every_steps=2,
                       train__keep_checkpoints=2))
    kept = sorted(p.name for p in (tmp_path / "run").glob("step-*.npz"))
    assert kept == ["step-00000008.npz", "step-00000010.npz"]
    newest, meta = checkpoint.load(tmp_path / "run" / "step-00000010.npz")
    assert meta["step"] == 10 and np.array_equal(newest["params"], checkpoint.load(tmp_path / "run" / "last.npz")[0]["params"])
    assert checkpoint.load(tmp_path / "run" / "step-00000008.npz")[1]["step"] == 8
