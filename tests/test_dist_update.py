"""dist.update = "workers" (each worker sums its slice of every gradient slot and applies SGD to it, in shared
memory) against dist.update = "coordinator" (the coordinator alone): the same weights, momentum and BN buffers,
bit for bit. And a worker that dies with its slice half-updated: under `continue` the step is redone from the
untouched half of the double buffer, which equals stopping before that step and resuming with one worker fewer;
under `abort` the checkpoint is the state before the step. With train.ema_epochs the weight average too. A model with several CHUNK blocks of parameters, so the slices are real."""
from __future__ import annotations

import numpy as np
import pytest
from distutil import arrays, launch_inproc, step_records, tiny_cfg

from dptrain.optim import CHUNK, SGD, add_blocks, chunk_slices, chunk_squares, sum_of_squares

WIDE = dict(model__hidden=256, train__batch_size=31, train__epochs=2)


def test_chunk_slices_cover_on_block_boundaries():
    for size, n in [(10, 3), (CHUNK * 5 + 7, 3), (CHUNK * 144, 8), (CHUNK * 2, 4)]:
        s = chunk_slices(size, n)
        assert s[0][0] == 0 and s[-1][1] == size and len(s) == n
        assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
        assert all(lo % CHUNK == 0 for lo, _ in s)


def test_slices_reproduce_the_whole_array_bitwise():
    """Norm from per-slice block sums, SGD slice by slice out of place: the bits of one in-place pass."""
    rng = np.random.default_rng(0)
    size = CHUNK * 3 + 123
    w, g, v = (rng.standard_normal(size).astype(np.float32) for _ in range(3))
    parts = np.concatenate([chunk_squares(g[lo:hi]) for lo, hi in chunk_slices(size, 3)])
    assert add_blocks(parts) == sum_of_squares(g)
    ranges = [(0, 1000), (5000, size - 7)]
    whole = SGD(size, momentum=0.9, weight_decay=5e-4, decay_ranges=ranges, velocity=v.copy())
    w_whole, g_whole = w.copy(), g.copy()
    whole.step(w_whole, g_whole, 0.05, scale=0.5)
    sliced = SGD(size, momentum=0.9, weight_decay=5e-4, decay_ranges=ranges)
    w_out, v_out, g_sl = np.empty_like(w), np.empty_like(v), g.copy()
    for lo, hi in chunk_slices(size, 3):
        sliced.step(w, g_sl, 0.05, 0.5, lo, hi, params_out=w_out, velocity_in=v, velocity_out=v_out)
    assert np.array_equal(w_out, w_whole) and np.array_equal(v_out, whole.velocity)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bn", ["stats", "sync"])
def test_workers_update_equals_coordinator_update(tiny_data, tmp_path, bn):
    kw = dict(dist__workers=3, dist__bn=bn, **WIDE)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "coord", dist__update="coordinator", **kw)) == 0
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "workers", dist__update="workers", **kw)) == 0
    a, b = arrays(tmp_path / "workers"), arrays(tmp_path / "coord")
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k
    assert [m["loss"] for m in step_records(tmp_path / "workers")] == \
        [m["loss"] for m in step_records(tmp_path / "coord")]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_worker_dying_mid_update_is_redone_from_the_old_weights(tiny_data, tmp_path, monkeypatch, ema):
    """Rank 1 dies with half its slice of step 4's update written (and, with train.ema_epochs, half its slice of the
    weight average, which the workers keep). Under `continue` the step is redone by the two survivors from the
    weights (and average) before it: bitwise the run that stopped at step 4 with 3 workers and resumed with 2."""
    kw = dict(dist__bn="sync", data__augment=False, train__ema_epochs=ema, **WIDE)
    ref = tmp_path / "ref"
    assert launch_inproc(tiny_cfg(tiny_data, ref, dist__workers=3, **kw), stop_at_step=4) == 0
    assert launch_inproc(tiny_cfg(tiny_data, ref, dist__workers=2, **kw), resume=True) == 0
    monkeypatch.setenv("DPTRAIN_FAULT", "update:4:1")
    run = tmp_path / "run"
    assert launch_inproc(tiny_cfg(tiny_data, run, dist__workers=3, dist__on_worker_failure="continue", **kw)) == 0
    a, b = arrays(run), arrays(ref)
    for k in ("params", "velocity", "buffers") + (("ema_params",) if ema else ()):
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.timeout(150)
def test_worker_dying_mid_update_under_abort_checkpoints_the_step_before(tiny_data, tmp_path, monkeypatch):
    """Under `abort`, rank 1 dying with half its slice of step 4's update (weights, momentum and weight average)
    written: last.npz is the state before step 4, bitwise the checkpoint of a run stopped there, not a mix of
    half-updated slices."""
    kw = dict(dist__workers=3, dist__bn="sync", data__augment=False, train__ema_epochs=0.5, **WIDE)
    ref = tmp_path / "ref"
    assert launch_inproc(tiny_cfg(tiny_data, ref, **kw), stop_at_step=4) == 0
    monkeypatch.setenv("DPTRAIN_FAULT", "update:4:1")
    run = tmp_path / "run"
    assert launch_inproc(tiny_cfg(tiny_data, run, dist__on_worker_failure="abort", **kw)) == 1
    a, b = arrays(run), arrays(ref)
    for k in ("params", "velocity", "buffers", "ema_params"):
        assert np.array_equal(a[k], b[k]), k
    assert [m["step"] for m in step_records(run)] == [0, 1, 2, 3]


@pytest.mark.timeout(150)
def test_one_reducer_per_core_gives_the_same_bits(tiny_data, tmp_path, monkeypatch):
    """More workers than physical cores: only the first `cores` of them reduce and update (launch passes the core
    count as DistExecutor's `reducers`): bitwise the weights, momentum and BN buffers of every worker taking a
    slice."""
    from dptrain.distributed.coordinator import Coordinator
    from dptrain.launcher import run as launch
    seen = []
    real = Coordinator.exchange

    def spy(self, kind, reply, step, attempt, per_rank, *a, **k):
        seen.append((kind.name, len(per_rank)))
        return real(self, kind, reply, step, attempt, per_rank, *a, **k)
    monkeypatch.setattr(Coordinator, "exchange", spy)
    kw = dict(dist__workers=3, data__augment=False, **WIDE)
    runs = {}
    for cores in (1, 8):
        monkeypatch.setattr(launch, "physical_cores", lambda c=cores: c)
        seen.clear()
        runs[cores] = tmp_path / f"cores{cores}"
        assert launch_inproc(tiny_cfg(tiny_data, runs[cores], **kw)) == 0
        assert {n for kind, n in seen if kind in ("REDUCE", "UPDATE")} == {min(cores, 3)}
    a, b = arrays(runs[1]), arrays(runs[8])
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k
