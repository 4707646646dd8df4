"""train.ema_epochs (ema.py): the moving average of the weights against a float64 recurrence, the run that keeps it
against itself (stopped and resumed: bitwise), against a real `launch --workers 2` (the replay: bitwise) and
against what it claims to evaluate (the validation accuracy written is the average's, and evaluate/predict/export
load the average); a checkpoint without the average resumes into a run with one; the mesh plane refuses it."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from distutil import arrays, launch_inproc, metrics, tiny_cfg
from helpers import make_config

from dptrain import config as C, ema as ema_mod
from dptrain.compute import evaluate_batches
from dptrain.data.dataset import load_dataset
from dptrain.distributed.replay import parse_layout, replay_executor
from dptrain.ema import WeightAverage, decay_for
from dptrain.inference.model_file import load_model
from dptrain.launcher.launch import launch
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore
from dptrain.optim import CHUNK
from dptrain.train import prepare, run_local


def test_decay_is_a_time_constant_in_epochs():
    assert decay_for(0, 22) == 0.0
    assert decay_for(0.5, 22) == pytest.approx(1 - 1 / 11)
    assert decay_for(1.0, 100) == pytest.approx(0.99)
    assert decay_for(0.01, 10) == 0.0  # a horizon under one step: the average is the weights
    with pytest.raises(ValueError, match="ema_epochs"):
        make_config({"train.ema_epochs": -1})


def test_average_follows_the_float64_recurrence_across_blocks():
    """avg_k = d avg_{k-1} + (1 - d) w_k over 30 steps of a 0.5 M-weight model (8 CHUNK blocks, the last partial):
    float32 within 1e-6 of float64, and exactly the starting weights' copy before the first update."""
    mcfg = C.ModelConfig(widths=[8, 16], res_width=16, hidden=512)
    rng = np.random.default_rng(0)
    store = ParamStore(np.float32)
    build_model(mcfg, 5, 32, store, rng=rng)
    P = store.num_params
    assert P > 7 * CHUNK and P % CHUNK
    w = rng.standard_normal(P).astype(np.float32)
    avg = WeightAverage(w, decay_for(0.5, 20))
    assert np.array_equal(avg.params, w) and avg.params is not w
    ref = w.astype(np.float64)
    d = avg.decay
    for _ in range(30):
        w = (w + 0.1 * rng.standard_normal(P)).astype(np.float32)
        avg.update(w)
        ref = d * ref + (1 - d) * w.astype(np.float64)
    assert np.abs(avg.params - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())


@pytest.mark.timeout(120)
def test_ema_run_resumes_bitwise_and_reports_the_average(tiny_data, tmp_path):
    cfg_a = tiny_cfg(tiny_data, tmp_path / "a", train__ema_epochs=0.5, train__epochs=3)
    run_local(cfg_a)
    cfg_b = tiny_cfg(tiny_data, tmp_path / "b", train__ema_epochs=0.5, train__epochs=3)
    assert run_local(cfg_b, stop_at_step=7)["interrupted"]
    run_local(cfg_b, resume=True)
    a, b = arrays(tmp_path / "a"), arrays(tmp_path / "b")
    for k in ("params", "velocity", "buffers", "ema_params"):
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["ema_params"], a["params"])  # a real average, not a copy
    # The last epoch's validation accuracy is the average's: load_model gives the average (with the live BN
    # statistics), and it scores exactly what metrics.jsonl says; the live weights score something else.
    model, cfg, _ = load_model(tmp_path / "a" / "last.npz")
    ds = load_dataset(cfg.data, cfg.train.seed)
    vloss, vcorrect, _ = evaluate_batches(model, ds.images, ds.labels, ds.val_idx, cfg.train.batch_size)
    last = [m for m in metrics(tmp_path / "a") if "val_acc" in m][-1]
    assert last["val_acc"] == vcorrect / len(ds.val_idx)
    assert last["val_loss"] == pytest.approx(vloss / len(ds.val_idx), rel=1e-12)
    model.store.params[...] = a["params"]
    live_loss = evaluate_batches(model, ds.images, ds.labels, ds.val_idx, cfg.train.batch_size)[0]
    assert live_loss != vloss


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport,update,wire", [("shm", "workers", "float32"), ("shm", "coordinator", "float32"),
                                                   ("socket", "coordinator", "float16")])
def test_launch_keeps_the_same_average_as_its_replay(tiny_data, tmp_path, monkeypatch, transport, update, wire):
    """The average is the Trainer's, from the weights the workers publish, and the workers evaluate it in the
    weights' place (shared memory; over sockets a full copy, then the live weights in full again, with the float16
    wire's updates after): a real 2-worker launch and its replay agree bitwise on the average, on the live weights
    and on every validation loss and accuracy, so the live weights came back intact after every evaluation."""
    extra = dict(train__ema_epochs=0.3, train__epochs=3, dist__workers=2, dist__transport=transport,
                 dist__update=update, dist__wire_dtype=wire)
    kept_by = []
    real_blend = ema_mod.blend
    monkeypatch.setattr(ema_mod, "blend", lambda *a, **k: (kept_by.append(a[3] is a[0]), real_blend(*a, **k))[1])
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "launch", **extra)) == 0
    # the coordinator's Trainer updated the average in place, every step, unless the workers keep it (shared memory,
    # dist.update = "workers": each blends the slice it updates; the replay below checks their bits)
    by_workers = transport == "shm" and update == "workers"
    assert (kept_by == []) if by_workers else (len(kept_by) >= 6 and all(kept_by)), kept_by[:3]
    run_local(tiny_cfg(tiny_data, tmp_path / "replay", **extra),
              executor_factory=replay_executor(parse_layout(workers=2)))
    a, b = arrays(tmp_path / "launch"), arrays(tmp_path / "replay")
    for k in ("params", "velocity", "ema_params", "buffers"):
        assert np.array_equal(a[k], b[k]), k
    keys = ("val_loss", "val_acc", "train_loss")
    va = [[m[k] for k in keys] for m in metrics(tmp_path / "launch") if "val_acc" in m]
    assert va == [[m[k] for k in keys] for m in metrics(tmp_path / "replay") if "val_acc" in m] and len(va) == 3
    # ...and training never saw the average: the run without it has the same live weights, momentum, BN statistics
    # and training losses (a worker left holding the average would have computed its next gradient there)
    run_local(tiny_cfg(tiny_data, tmp_path / "plain", **(extra | {"train__ema_epochs": 0})),
              executor_factory=replay_executor(parse_layout(workers=2)))
    c = arrays(tmp_path / "plain")
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], c[k]), k
    assert [m["loss"] for m in metrics(tmp_path / "launch") if "step_s" in m] == \
        [m["loss"] for m in metrics(tmp_path / "plain") if "step_s" in m]


def test_a_checkpoint_without_the_average_starts_it_from_its_weights(tiny_data, tmp_path):
    run_local(tiny_cfg(tiny_data, tmp_path / "r", train__epochs=1))
    assert "ema_params" not in arrays(tmp_path / "r")
    trainer = prepare(tiny_cfg(tiny_data, tmp_path / "r", train__epochs=2, train__ema_epochs=0.5), resume=True)
    assert np.array_equal(trainer.ema.params, trainer.store.params)


def test_the_mesh_plane_refuses_the_average(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path / "m", train__ema_epochs=0.5)
    args = argparse.Namespace(hostfile=None, hosts="127.0.0.1:1,127.0.0.2:1", no_ssh=False, max_restarts=0,
                              resume=False, stop_at_step=0)
    with pytest.raises(SystemExit, match="--train.ema_epochs=0, or --plane star"):
        launch(cfg, args)
