"""`dptrain train --replay-workers N` / `--replay-layout HxS` (replay.py): one process computes every step exactly as
the distributed run does, so its weights, momentum, BN buffers and per-step losses are the run's, bit for bit.

The default model family (widths 32-64-128, residual 256, hidden 512) at 16x16 on the synthetic faces, 3 workers
over batches of 16 (uneven shards 6/5/5), 50 steps; a real `launch` is the reference every time. Plus one multi-host
layout (two agents on 127.0.0.1, the mesh plane with the float16 wire), a resumed replay, and the mathematics across
worker counts: one step of 1 process vs 3 workers agrees to float rounding.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from distutil import Proc, arrays, inject_faults, launch_inproc, metrics, step_records, tiny_values
from gradcheck import rel_error
from helpers import make_config

from dptrain.distributed.replay import Layout, parse_layout, read_membership, replay_executor
from dptrain.train import run_local

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2

STEPS = 50  # 5 epochs of 10 batches of 16 (169 training images)


def default_cfg(data, out, **extra):
    """The default model (not the tiny one) at 16x16: 1.5 M parameters, a few ms a step."""
    return make_config(tiny_values(data, out, data__image_size=16, train__batch_size=16,
                                   train__epochs=STEPS // 10, dist__workers=3, **extra))


def assert_same_run(a, b, steps: int = STEPS):
    """Bitwise: weights, momentum, BN buffers, every step's loss / accuracy / gradient norm, every epoch's train
    loss, validation loss and accuracy."""
    x, y = arrays(a), arrays(b)
    for k in ("params", "velocity", "buffers"):
        assert np.array_equal(x[k], y[k]), (k, np.abs(x[k] - y[k]).max())
    sa, sb = step_records(a), step_records(b)
    assert len(sa) == len(sb) == steps
    for k in ("loss", "acc", "grad_norm", "lr"):
        assert [m[k] for m in sa] == [m[k] for m in sb], k
    ea, eb = ([m for m in metrics(r) if "train_loss" in m] for r in (a, b))
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[m[k] for k in keys] for m in ea] == [[m[k] for k in keys] for m in eb]


@pytest.fixture(scope="module")
def launched(tiny_data, tmp_path_factory):
    """{bn: run folder of `launch --workers 3`}, made once."""
    root, runs = tmp_path_factory.mktemp("launched"), {}

    def get(bn: str):
        if bn not in runs:
            out = root / bn
            assert launch_inproc(default_cfg(tiny_data, out, dist__bn=bn)) == 0
            runs[bn] = out
        return runs[bn]
    return get


@pytest.mark.timeout(150)
def test_replay_equals_launch_bitwise(tiny_data, tmp_path, launched):
    """--bn stats, augmentation on: 50 steps (5 epochs, 5 evaluations) in one go."""
    run_local(default_cfg(tiny_data, tmp_path / "replay"), executor_factory=replay_executor(Layout((1,) * 3, False)))
    assert_same_run(launched("stats"), tmp_path / "replay")


@pytest.mark.timeout(150)
def test_sync_bn_replay_stopped_and_resumed_equals_launch_bitwise(tiny_data, tmp_path, launched):
    """--bn sync (every BN reduction summed in rank order): stopped mid-epoch at step 23, resumed from last.npz,
    the run ends on the launch's bits."""
    cfg = default_cfg(tiny_data, tmp_path / "replay", dist__bn="sync")
    replay = replay_executor(parse_layout(workers=3))
    run_local(cfg, stop_at_step=23, executor_factory=replay)
    assert len(step_records(tmp_path / "replay")) == 23
    run_local(cfg, resume=True, executor_factory=replay)
    assert_same_run(launched("sync"), tmp_path / "replay")
    summary = json.loads((launched("sync") / "summary.json").read_text())
    assert summary["bn_sums"] == "workers (shared memory)"  # one host: the coordinator served none


@pytest.mark.timeout(150)
@pytest.mark.parametrize("restarts", [0, 1])
def test_replay_follows_a_run_that_lost_a_worker(tiny_data, tmp_path, monkeypatch, restarts):
    """--bn sync, --on-worker-failure continue: rank 1 crashes as step 7 begins, the step is redone on ranks 0 and 2,
    and then either the survivors go on alone or a replacement computes from step 8 on. metrics.jsonl names the
    ranks of every step not computed by all; --replay-membership follows them, evaluations included, bitwise."""
    inject_faults(monkeypatch, "exit:7:1")
    run = tmp_path / "run"
    assert launch_inproc(default_cfg(tiny_data, run, dist__bn="sync", dist__on_worker_failure="continue",
                                     dist__max_worker_restarts=restarts)) == 0
    membership = read_membership(run)
    assert membership == ({7: [0, 2]} if restarts else {s: [0, 2] for s in range(7, STEPS)})
    replay = replay_executor(parse_layout(workers=3), membership)
    run_local(default_cfg(tiny_data, tmp_path / "replay", dist__bn="sync"), executor_factory=replay)
    assert_same_run(run, tmp_path / "replay")
    with pytest.raises(ValueError, match="step 7 was computed by ranks"):
        replay_executor(parse_layout(workers=2), membership)(*[None] * 5)


@pytest.mark.timeout(90)
def test_replay_of_one_worker_is_the_single_process(tiny_data, tmp_path):
    """--replay-workers 1 (what `launch --workers 1` computes) with --dist.factored=false is bitwise `dptrain train`
    on the same machine: one shard, the same GEMMs on the same BLAS threads (a one-worker launch's: every core, the
    default of this session, whose conftest clears OPENBLAS_NUM_THREADS and the like).
    With dist.factored (the default) the one worker computes the hidden Linear's weight gradient from its factors in
    blocks of reduce.ROWS rows: other GEMM shapes than `dptrain train`'s one product, so the same bits only on BLAS
    kernels whose results do not depend on the shape (OpenBLAS's AVX-512 kernels; not its AVX2 ones, which
    `make test-avx2` runs). That case is the same mathematics, as different worker counts are (the test below)."""
    run_local(default_cfg(tiny_data, tmp_path / "train", dist__bn="sync", dist__factored=False), stop_at_step=10)
    run_local(default_cfg(tiny_data, tmp_path / "replay", dist__bn="sync", dist__factored=False), stop_at_step=10,
              executor_factory=replay_executor(parse_layout(workers=1)))
    assert_same_run(tmp_path / "train", tmp_path / "replay", 10)


@pytest.mark.timeout(90)
def test_one_step_one_process_equals_workers_to_rounding(tiny_data, tmp_path):
    """Different worker counts: the same mathematics. After one step of the default model, 1 process and 3
    workers agree to float32 rounding (the sums are grouped differently, so not bitwise; over tens of steps they
    part ways like any two float32 trainings: README, Reproducibility)."""
    run_local(default_cfg(tiny_data, tmp_path / "one", dist__bn="sync", data__augment=False), stop_at_step=1)
    assert launch_inproc(default_cfg(tiny_data, tmp_path / "three", dist__bn="sync", data__augment=False),
                         stop_at_step=1) == 0
    a, b = arrays(tmp_path / "one"), arrays(tmp_path / "three")
    assert rel_error(a["params"], b["params"]) < 1e-6
    assert rel_error(a["buffers"], b["buffers"]) < 1e-6
    assert rel_error(a["velocity"], b["velocity"]) < 1e-5  # the clipped gradient itself
    la, lb = step_records(tmp_path / "one")[0]["loss"], step_records(tmp_path / "three")[0]["loss"]
    assert abs(la - lb) <= 1e-6 * abs(la)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("plane,wire,bn,cipher", [("mesh", "float16", "sync", "curve"), ("star", "float32", "stats", "curve"),
                                                  ("mesh", "float16", "sync", "aes-gcm")])
def test_replay_layout_equals_two_hosts_bitwise(tiny_data, tmp_path, plane, wire, bn, cipher):
    """`launch -H 127.0.0.1:2,localhost:2 --no-ssh` with two agents started here (2 hosts x 2 workers), then
    `dptrain train --replay-layout 2x2` on the command line: the same bits. The mesh with the float16 wire covers
    the host-local sums, the host-order sums of each fixed piece's float16 encoding and the rounded updates."""
    steps = 20
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in tiny_values(
        tiny_data, tmp_path / "x", data__image_size=16, train__batch_size=16, train__epochs=2, dist__plane=plane,
        dist__wire_dtype=wire, dist__bn=bn, dist__bulk_cipher=cipher).items() if k != "train.out"]
    out, port, run_id = tmp_path / "hosts", 29900 + os.getpid() % 80, f"replay{os.getpid()}"
    with Proc([sys.executable, "-m", "dptrain", "launch", "-H", "127.0.0.1:2,localhost:2", "--no-ssh", "--bind",
               "127.0.0.1", "--port", str(port), "--run-id", run_id, f"--train.out={out}", *flags],
              tmp_path / "launch.log") as la:
        la.wait_log(r"--host-index 1 ", 60)
        agents = [Proc([sys.executable, "-m", "dptrain", "agent", "--connect", f"tcp://127.0.0.1:{port}", "--run",
                        run_id, "--host-index", str(i), "--slots", "2", "--keys", str(out / "agent-keys.json"),
                        "--host-label", f"h{i}"], tmp_path / f"agent{i}.log") for i in range(2)]
        try:
            assert la.wait(120) == 0, la.log() + "".join(a.log() for a in agents)
            for a in agents:
                assert a.wait(30) == 0, a.log()
        finally:
            for a in agents:
                a.close()
    with Proc([sys.executable, "-m", "dptrain", "train", "--replay-layout", "2x2", f"--train.out={tmp_path / 'r'}",
               *flags], tmp_path / "replay.log") as rp:
        assert rp.wait(120) == 0, rp.log()
        assert "replay of 2 hosts x 2 workers" in rp.log()
    assert_same_run(out, tmp_path / "r", steps)


def test_each_rank_computes_with_its_workers_blas_threads(tiny_data, tmp_path):
    """GEMM bits depend on the BLAS thread count (OpenBLAS, some shapes): a replay computes with what each worker of
    the run had, session.blas_threads of the workers on its host (or dist.blas_threads)."""
    from threadpoolctl import threadpool_info

    from dptrain.distributed.session import blas_threads
    from dptrain.train import prepare
    for layout, on_host, fixed in ((parse_layout(workers=3), 3, 0), (parse_layout(layout="3x2"), 2, 0),
                                   (parse_layout(workers=2), 2, 1)):
        cfg = default_cfg(tiny_data, tmp_path / "x", dist__blas_threads=fixed)
        t = prepare(cfg, False)
        ex = replay_executor(layout)(cfg, t.model, t.ds, t.store, t.opt)
        try:
            assert ex.threads == blas_threads(cfg, on_host)
            assert min(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas") == ex.threads
        finally:
            ex.close()


@pytest.mark.timeout(60)
def test_bench_agree_counts_the_steps_within_tolerance(tiny_data, tmp_path):
    """`dptrain bench --agree 1,3`'s row: with --bn sync the first steps agree to 1e-6 (the mathematics is the same)."""
    from dptrain.bench.repro import agreement, format_agreement
    r = agreement(default_cfg(tiny_data, tmp_path / "x", dist__bn="sync"), (1, 3), 3)
    assert r["steps_within_tol"] == 3 and all(0 < d < 1e-6 for d in r["rel_diff"]), r
    assert "agree to 1e-06 for 3 of 3 steps" in format_agreement(r)


def test_layout_flags():
    assert parse_layout(workers=4) == Layout((1, 1, 1, 1), False)
    assert parse_layout(layout="3x2") == Layout((2, 2, 2), True)
    assert parse_layout() is None
    for bad in ("3", "0x2", "2x"):
        with pytest.raises(ValueError, match="HOSTSxSLOTS"):
            parse_layout(layout=bad)
