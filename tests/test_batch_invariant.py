"""--batch-invariant (invariant.py): one process, `launch --workers 2` and `--workers 3` give bitwise the same
weights, momentum, BN buffers and per-step losses (--bn sync, tiny model, ~20 steps, uneven shards, a short block
and a short last batch), with both shared-memory update modes and socket transport."""
from __future__ import annotations

import numpy as np
import pytest
from distutil import arrays, launch_inproc, step_records, tiny_cfg

from dptrain.distributed import invariant
from dptrain.distributed.executor import split_by_slots
from dptrain.train import run_local

# batch 29 with blocks of 4: 7 whole blocks and one of 1; steps_per_epoch 7 with drop_last off ends each epoch on a
# short batch too (169 train images = 5 * 29 + 24 ... whatever the split: both N see the same batches)
INV = dict(dist__bn="sync", train__batch_size=29, train__batch_invariant_block=4, train__epochs=4,
           train__drop_last=False, train__steps_per_epoch=0)
STEPS = 20


def test_split_blocks_whole_blocks_in_order():
    idx = np.arange(100, 129)  # 29 samples, blocks of 4: 8 blocks (the last of 1)
    for slots in ([1], [2], [3], [1, 1, 1], [4], [8], [9]):
        parts, sizes = invariant.split_blocks(idx, slots, 4)
        assert np.array_equal(np.concatenate(parts), idx)
        flat = [s for ss in sizes for s in ss]
        assert sum(flat) == 29
        bounds = np.cumsum([0] + flat)[:-1]
        assert all(b % 4 == 0 for b, s in zip(bounds, flat) if s)  # every shard starts on a block boundary
        counts = [-(-s // 4) for s in flat]
        assert max(counts) - min(counts) <= 1
    # the normal split is unchanged
    assert [len(b) for b in split_by_slots(idx, [1, 1, 1])[0]] == [10, 10, 9]


def test_limbs_and_grads_sum_exactly_in_any_order():
    rng = np.random.default_rng(0)
    vs = [rng.normal(0, 10.0 ** rng.integers(-9, 6), 33) for _ in range(50)]
    encs = [invariant.encode_limbs(v) for v in vs]
    fwd = np.zeros_like(encs[0])
    for e in encs:
        fwd += e
    rev = np.zeros_like(encs[0])
    for e in encs[::-1]:
        rev += e
    pair = sum(encs[0::2]) + sum(encs[1::2])
    assert np.array_equal(fwd, rev) and np.array_equal(fwd, pair)
    assert np.allclose(invariant.decode_limbs(fwd), np.sum(vs, axis=0), rtol=1e-12, atol=1e-20)
    gs = [rng.normal(0, 1e-3, 70_000).astype(np.float32) for _ in range(6)]
    q = invariant.Quantizer()
    accs = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]):
        acc = np.zeros(70_000, np.int64)
        for i in order:
            q.add(acc, gs[i])
        accs.append(acc)
    halves = [np.zeros(70_000, np.int64), np.zeros(70_000, np.int64)]
    for i in range(6):
        q.add(halves[i % 2], gs[i])
    out = [np.empty(70_000, np.float32) for _ in range(3)]
    invariant.decode_grads(out[0], [accs[0]])
    invariant.decode_grads(out[1], [accs[1]])
    invariant.decode_grads(out[2], halves)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
    assert np.allclose(out[0], np.sum(gs, axis=0, dtype=np.float64), rtol=1e-6, atol=1e-11)
    assert q.saturated == 0
    big = np.full(10, 5000.0, np.float32)  # beyond GRAD_LIMIT: saturates, and says so
    acc = np.zeros(10, np.int64)
    q.add(acc, big)
    assert q.saturated == 1 and np.all(acc == int(invariant.GRAD_LIMIT * 2 ** invariant.GRAD_FRAC_BITS))
    with pytest.raises(FloatingPointError):
        q.add(acc, np.array([np.nan], np.float32))


def _same(a, b):
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inv") / "local"
    run_local(tiny_cfg(tiny_data, out, **INV), stop_at_step=STEPS)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,extra", [(2, {}), (3, {"dist__update": "coordinator"}),
                                           (2, {"dist__transport": "socket"})])
def test_workers_bitwise_one_process(tiny_data, tmp_path, one_process, workers, extra):
    out = tmp_path / "run"
    assert launch_inproc(tiny_cfg(tiny_data, out, dist__workers=workers, **INV, **extra), stop_at_step=STEPS) == 0
    _same(arrays(out), arrays(one_process))
    got, ref = step_records(out), step_records(one_process)
    assert len(got) == len(ref) == STEPS
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert [m["grad_norm"] for m in got] == [m["grad_norm"] for m in ref]


def test_normal_mode_differs_and_stats_refused(tiny_data, tmp_path, one_process):
    """The invariant run is a run of its own (not bitwise the normal mode), and `--bn stats` cannot be invariant."""
    from dptrain.cli import main
    out = tmp_path / "normal"
    run_local(tiny_cfg(tiny_data, out, **{**INV, "train__batch_invariant_block": 0}), stop_at_step=STEPS)
    a, b = arrays(out)["params"], arrays(one_process)["params"]
    assert not np.array_equal(a, b) and np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(a)
    with pytest.raises(SystemExit, match="--bn sync"):
        main(["launch", "--workers", "2", "--batch-invariant", "4", "--out", str(tmp_path / "x")])
