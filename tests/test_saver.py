"""Checkpoints written behind the training (saver.py): the file holds the state at the save, not what the steps that
ran during the write made of it; the Trainer does not wait for the disk; failures are reported when collected."""
import threading

import numpy as np
import pytest

from dptrain import checkpoint
from dptrain.checkpoint import CheckpointWriteError
from dptrain.saver import BackgroundWriter
from dptrain.train import prepare


def _blocking_save(monkeypatch):
    """checkpoint.save that waits for `release` (a disk that has not answered yet)."""
    started, release = threading.Event(), threading.Event()
    real = checkpoint.save

    def save(path, **kw):
        started.set()
        assert release.wait(30)
        real(path, **kw)

    monkeypatch.setattr(checkpoint, "save", save)
    return started, release


def test_the_file_holds_the_snapshot_not_later_steps(tiny_data, tmp_path, monkeypatch):
    from distutil import tiny_cfg
    trainer = prepare(tiny_cfg(tiny_data, tmp_path / "r", train__ema_epochs=0.5), resume=False)
    trainer.out.mkdir(parents=True)
    started, release = _blocking_save(monkeypatch)
    before = (trainer.store.params.copy(), trainer.opt.velocity.copy(), trainer.ema.params.copy())
    trainer.save("last", best=True)
    assert started.wait(30) and trainer.writer.busy  # save() returned while the write waits for the disk
    trainer.store.params += 1.0  # "the next steps"
    trainer.opt.velocity -= 1.0
    trainer.ema.params *= 2.0
    trainer.step = 7
    release.set()
    trainer.collect_save()
    assert not trainer.writer.busy and trainer.unsaved is None
    for name in ("last", "best"):
        arrays, meta = checkpoint.load(trainer.out / f"{name}.npz")
        assert meta["step"] == 0
        for a, b in zip((arrays["params"], arrays["velocity"], arrays["ema_params"]), before):
            assert np.array_equal(a, b)
    assert (trainer.out / "best.npz").stat().st_ino == (trainer.out / "last.npz").stat().st_ino  # one write


def test_a_failed_write_is_reported_when_collected_and_training_can_go_on(tiny_data, tmp_path, monkeypatch):
    from distutil import tiny_cfg
    trainer = prepare(tiny_cfg(tiny_data, tmp_path / "r"), resume=False)
    trainer.out.mkdir(parents=True)
    calls = []

    def full_disk(path, **kw):
        calls.append(path.name)
        raise CheckpointWriteError(28, f"{path}: cannot write the checkpoint (No space left on device)")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    trainer.save("last", best=True)
    trainer.collect_save()
    assert calls == ["last.npz", "best.npz"]  # the best model is tried on its own when its first name fails
    assert isinstance(trainer.unsaved, CheckpointWriteError) and trainer.saved_at is None
    monkeypatch.undo()
    trainer.save("last")  # the next save collects nothing new and writes
    trainer.collect_save()
    assert trainer.unsaved is None and (trainer.out / "last.npz").exists()
    assert trainer.saved_at == trainer._position()


def test_writer_reraises_a_bug_and_reuses_its_buffers():
    w = BackgroundWriter()
    a = np.arange(10, dtype=np.float32)
    snap = w.snapshot(x=a, none=None)
    assert snap["none"] is None and np.array_equal(snap["x"], a) and snap["x"] is not a
    w.start(lambda: 1 / 0, "tok")
    with pytest.raises(ZeroDivisionError):
        w.collect()
    assert not w.busy and w.collect() is None
    assert w.snapshot(x=a + 1)["x"] is snap["x"]  # the same buffer, new contents
    w.start(lambda: None, "tok2")
    assert w.collect() == ("tok2", None)
