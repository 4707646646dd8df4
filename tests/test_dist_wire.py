"""float16 on the wire (dptrain/distributed/wire.py), compared against float32 arithmetic and against the coordinator.

- encode16/add16 keep small gradients (1e-7..1e-4) to float16's relative precision, where a plain cast flushes them.
- A peer that starts from a full copy and applies the coordinator's float16 updates holds, step after step, the
  coordinator's weights bit for bit (the coordinator rounds its own update through the same encoding).
- End to end (`--dist.transport=socket --wire-dtype float16`, real workers): the validation loss the workers
  compute with their rebuilt weights equals the loss of the coordinator's checkpoint evaluated in this process.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from distutil import launch_inproc, tiny_cfg

from dptrain.compute import evaluate_batches
from dptrain.data.dataset import load_dataset
from dptrain.distributed.wire import add16, apply_update16, encode16, receive_weights
from dptrain.inference.model_file import load_model
from dptrain.optim import SGD


def test_small_gradients_survive_float16():
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-7, -4, 200_000)).astype(np.float32)
    g16, scale = encode16(g)
    back = np.empty_like(g)
    add16(back, g16, scale, first=True)
    big = np.abs(g) > np.abs(g).max() * 2.0 ** -25  # within float16's normal range after scaling
    rel = np.abs(back - g)[big] / np.abs(g)[big]
    assert rel.max() < 2.0 ** -11  # float16's half-ulp
    naive = g.astype(np.float16).astype(np.float32)
    assert (naive == 0).sum() > 1000 and (back == 0).sum() < 10  # a plain cast loses them


def test_scale_is_a_power_of_two_and_zero_is_safe():
    g16, scale = encode16(np.zeros(10, np.float32))
    assert scale == 1.0 and not g16.any()
    _, scale = encode16(np.array([3e-5, -1e-6], np.float32))
    assert np.log2(scale) == int(np.log2(scale))


def test_peer_replica_stays_bitwise_equal_over_many_steps():
    rng = np.random.default_rng(1)
    P = 70_000  # a few blocks and a partial one
    params = rng.standard_normal(P).astype(np.float32)
    opt = SGD(P, momentum=0.9, weight_decay=5e-4, decay_ranges=[(0, P // 2)])
    prev, upd = params.copy(), np.empty(P, np.float16)
    replica, replica_buffers = params.copy(), np.zeros(4, np.float32)  # the peer received one full copy
    for step in range(25):
        grads = (rng.standard_normal(P) * 1e-3).astype(np.float32)
        opt.step(params, grads, lr=0.05)
        scale = apply_update16(params, prev, upd)
        assert receive_weights(replica, replica_buffers, {"update": upd, "buffers": np.full(4, step, np.float32)},
                               {"update_scale": scale})
        assert np.array_equal(replica, params), step
        assert np.array_equal(prev, params)
    assert replica_buffers[0] == 24


@pytest.mark.timeout(120)
def test_socket_float16_workers_rebuild_the_coordinators_weights(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, dist__workers=2, dist__transport="socket", dist__wire_dtype="float16",
                   train__epochs=2, data__augment=False)
    assert launch_inproc(cfg) == 0
    last = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"epoch": 2,' in ln
            and "val_loss" in ln][-1]
    model, _, _ = load_model(out / "last.npz")  # the coordinator's weights
    ds = load_dataset(cfg.data, cfg.train.seed, progress=False)
    loss_sum, correct, _ = evaluate_batches(model, ds.images, ds.labels, ds.val_idx, 16)
    # same weights -> same loss (to float rounding of a different batching); a missed or misapplied update would
    # move it by far more
    assert loss_sum / len(ds.val_idx) == pytest.approx(last["val_loss"], rel=1e-5)
    assert correct / len(ds.val_idx) == last["val_acc"]
