"""One-host distributed training compared with the single-process trainer (`dptrain.train.run_local`), the
reference: same global batches, same weights. Real coordinator + worker processes on 127.0.0.1, tiny model.

Why two tolerances for the 20-step runs: float32 sums over a split batch are not the sums over the whole batch
(~5e-7 relative per gradient), and ReLU/max-pool choices near a tie can flip on such a difference; one flip moves
one gradient entry by up to ~1e-2 of that tensor's largest, and momentum carries it on. The forward of the first
step is bitwise the same (BN moments are summed in float64), so the one-step test holds the math to float32
rounding; over 20 steps the norm-wise difference stays < 1e-5 while the single largest entry may drift further.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from distutil import arrays, launch_inproc, metrics, params, step_records, tiny_cfg
from gradcheck import norm_rel_error, rel_error

from dptrain.train import prepare, run_local

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2

# He init (not the default PyTorch one, whose 2.4x smaller conv weights train faster): over 20 steps the float32
# rounding differences of the two reduction orders stay ~1e-8 here, where PyTorch's init lets a ReLU / max-pool flip
# after ~10 steps lift them to ~1e-3 (still 1e-8 through 6 steps)
SYNC = dict(dist__bn="sync", data__augment=False, model__init="he")


@pytest.fixture(scope="module")
def local_runs(tiny_data, tmp_path_factory):
    """Single-process references: {(batch_size, steps): run folder}."""
    root = tmp_path_factory.mktemp("local")
    cache = {}

    def get(bs: int, steps: int):
        if (bs, steps) not in cache:
            out = root / f"b{bs}_s{steps}"
            run_local(tiny_tiny(tiny_data, out, bs), stop_at_step=steps)
            cache[bs, steps] = out
        return cache[bs, steps]
    return get


def tiny_tiny(data, out, bs: int, **kw):
    return tiny_cfg(data, out, train__batch_size=bs, train__epochs=4, **{**SYNC, **kw})


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [2, 3])
def test_sync_bn_one_step_matches_single_process(tiny_data, tmp_path, local_runs, workers):
    """31 over 2 or 3 workers (uneven shards): after one step the weights and the momentum (= the clipped
    gradient) agree with one process to float32 rounding."""
    ref = arrays(local_runs(31, 1))
    assert launch_inproc(tiny_tiny(tiny_data, tmp_path / "run", 31, dist__workers=workers), stop_at_step=1) == 0
    got = arrays(tmp_path / "run")
    assert rel_error(got["params"], ref["params"]) < 1e-6
    assert rel_error(got["velocity"], ref["velocity"]) < 1e-5
    assert rel_error(got["buffers"], ref["buffers"]) < 1e-6


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bs,workers", [(32, 2), (31, 2), (31, 3)])
def test_sync_bn_20_steps_matches_single_process(tiny_data, tmp_path, local_runs, bs, workers):
    ref = params(local_runs(bs, 20))
    assert launch_inproc(tiny_tiny(tiny_data, tmp_path / "run", bs, dist__workers=workers), stop_at_step=20) == 0
    got = params(tmp_path / "run")
    assert len(step_records(tmp_path / "run")) == 20
    assert norm_rel_error(got, ref) < 1e-5, rel_error(got, ref)
    assert rel_error(got, ref) < 1e-4


@pytest.mark.timeout(90)
def test_same_seed_same_bits(tiny_data, tmp_path):
    """Default settings (bn stats, augmentation on), 2 workers, twice: bitwise the same weights and losses."""
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert launch_inproc(tiny_cfg(tiny_data, out, train__epochs=2, dist__workers=2)) == 0
        runs.append(out)
    a, b = arrays(runs[0]), arrays(runs[1])
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k
    assert [m["loss"] for m in step_records(runs[0])] == [m["loss"] for m in step_records(runs[1])]


@pytest.mark.timeout(60)
def test_bn_stats_running_stats_from_global_moments(tiny_data, tmp_path):
    """--bn stats: after one step the running stats are those of the summed per-shard moments of the global batch
    (each shard normalised by its own statistics), recomputed here in one process."""
    from dptrain.data.augment import make_batch
    from dptrain.data.sampler import shard
    cfg = tiny_cfg(tiny_data, tmp_path / "run", dist__workers=2, dist__bn="stats", train__batch_size=31)
    assert launch_inproc(cfg, stop_at_step=1) == 0
    got = arrays(tmp_path / "run")["buffers"]

    ref = prepare(tiny_cfg(tiny_data, tmp_path / "ref", train__batch_size=31), resume=False)  # initial weights
    idx = ref.sampler.batches(0)[0]
    x = make_batch(ref.ds.images, idx, epoch=0, seed=cfg.train.seed, augment=True, max_shift=cfg.data.max_shift)
    moments = np.zeros(ref.model.bn_moments_size)
    for r in range(2):
        lo, hi = (0, 16) if r == 0 else (16, 31)
        assert np.array_equal(shard(idx, r, 2), idx[lo:hi])
        ref.model.forward(x[lo:hi], train=True)
        moments += ref.model.bn_moments()
    before = ref.store.buffers.copy()
    ref.model.update_running_stats(moments, cfg.model.bn_momentum)
    assert not np.allclose(before, ref.store.buffers)
    assert rel_error(got, ref.store.buffers) < 1e-6
    # ... and not the statistics of the whole batch normalised at once (what --bn sync would give)
    ref.store.buffers[...] = before
    ref.model.forward(x, train=True)
    ref.model.update_running_stats(ref.model.bn_moments(), cfg.model.bn_momentum)
    assert rel_error(got, ref.store.buffers) > 1e-4


@pytest.mark.timeout(120)
def test_resume_mid_epoch_with_other_worker_count(tiny_data, tmp_path):
    """Stopped at step 7 (mid epoch 2) with 3 workers, resumed with 2: the weights of an uninterrupted 2-worker run."""
    kw = dict(train__epochs=2, train__batch_size=31, **SYNC)
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert launch_inproc(tiny_cfg(tiny_data, whole, dist__workers=2, **kw)) == 0
    assert launch_inproc(tiny_cfg(tiny_data, part, dist__workers=3, **kw), stop_at_step=7) == 0
    _, meta = __import__("dptrain.checkpoint", fromlist=["load"]).load(part / "last.npz")
    assert (meta["step"], meta["epoch"], meta["step_in_epoch"]) == (7, 1, 2)
    assert launch_inproc(tiny_cfg(tiny_data, part, dist__workers=2, **kw), resume=True) == 0
    assert norm_rel_error(params(part), params(whole)) < 1e-5
    assert rel_error(params(part), params(whole)) < 1e-5
    steps = [m["step"] for m in step_records(part)]
    assert steps == list(range(10)), steps
    assert json.loads((part / "summary.json").read_text())["steps"] == 10


@pytest.mark.timeout(60)
def test_resume_single_process_bitwise(tiny_data, tmp_path):
    kw = dict(train__epochs=2, train__batch_size=31)  # augmentation on: its seeds must survive the resume too
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_local(tiny_cfg(tiny_data, whole, **kw))
    assert run_local(tiny_cfg(tiny_data, part, **kw), stop_at_step=7)["interrupted"]
    summary = run_local(tiny_cfg(tiny_data, part, **kw), resume=True)
    assert summary["steps"] == 10 and not summary["interrupted"]
    a, b = arrays(part), arrays(whole)
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k
    assert [m["loss"] for m in step_records(part)] == [m["loss"] for m in step_records(whole)]
    epochs = [m for m in metrics(part) if "val_acc" in m]
    assert [m["val_acc"] for m in epochs] == [m["val_acc"] for m in metrics(whole) if "val_acc" in m]


@pytest.mark.timeout(90)
def test_socket_transport_equals_shm(tiny_data, tmp_path):
    kw = dict(train__epochs=2, dist__workers=2, train__batch_size=31)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "shm", **kw)) == 0
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "sock", dist__transport="socket", **kw)) == 0
    a, b = arrays(tmp_path / "sock"), arrays(tmp_path / "shm")
    for k in ("params", "velocity", "buffers"):
        assert rel_error(a[k], b[k]) < 1e-6, k


@pytest.mark.timeout(60)
def test_fewer_images_than_workers(tiny_data, tmp_path):
    """A global batch of 2 over 3 workers (one has nothing to do): runs, and matches one process under sync BN."""
    kw = dict(train__batch_size=2, train__epochs=1, train__steps_per_epoch=3, **SYNC)
    run_local(tiny_cfg(tiny_data, tmp_path / "ref", **kw))
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "run", dist__workers=3, **kw)) == 0
    assert [m["step"] for m in step_records(tmp_path / "run")] == [0, 1, 2]
    assert rel_error(params(tmp_path / "run"), params(tmp_path / "ref")) < 1e-5
