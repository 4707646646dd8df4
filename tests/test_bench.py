"""`dptrain bench` end to end with a tiny model: the single-process JSON and the multi-worker CSV/JSON/PNG outputs.

Nothing is compared against a reference here (throughput is machine-dependent): the tests check that the bench runs
the real paths (the trainer's step in this process; launch_local with real worker processes) and reports numbers.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import psutil
import pytest

TINY = ["--batch-size", "16", "--image-size", "16", "--classes", "10", "--steps", "2", "--warmup", "1",
        "--no-progress", "--model.widths=[8]", "--model.res_width=0", "--model.hidden=16"]


def run_cli(args, tmp_path, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "dptrain", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_single_process_json(tmp_path):
    proc = run_cli(["--json", *TINY], tmp_path)
    r = json.loads(proc.stdout)  # stdout is exactly one JSON object; logs went to stderr
    assert r["images_per_s"] > 0
    assert r["mode"] == "single" and r["threads"] == 1
    assert set(r["phases_ms"]) >= {"forward", "backward", "sgd_update"}
    assert "Conv2D" in r["layers_ms"]
    conv, bn = r["layers_ms"]["Conv2D"], r["layers_ms"]["BNPoolReLU"]
    assert conv["forward_gflops"] > 0 and conv["backward_gflops"] > 0 and r["gemm_peak_gflops"] > 0
    assert conv["forward_pct_of_peak"] == pytest.approx(100 * conv["forward_gflops"] / r["gemm_peak_gflops"])
    assert "forward_gflops" not in bn  # memory-bound: no GEMM FLOPs to speak of


def test_gemm_flops_count_the_direct_products():
    """Forward FLOPs per layer as a direct GEMM does them; backward twice that (dW and dx), once for the first conv."""
    import numpy as np

    from dptrain.bench.local import instrument
    from dptrain.config import ModelConfig
    from dptrain.nn.layers import Conv2D, Linear
    from dptrain.nn.loss import softmax_cross_entropy
    from dptrain.nn.model import build_model
    from dptrain.nn.params import ParamStore
    model = build_model(ModelConfig(widths=[4, 8], res_width=0, hidden=16), 3, 8, ParamStore(np.float32),
                        rng=np.random.default_rng(0))
    _, flops = instrument(model)
    x = np.random.default_rng(1).standard_normal((5, 8, 8, 3)).astype(np.float32)
    _, dlogits, _ = softmax_cross_entropy(model.forward(x, train=True), np.array([0, 1, 2, 0, 1]), 5)
    model.backward(dlogits)
    conv = 2 * 5 * (8 * 8 * 9 * 3 * 4 + 4 * 4 * 9 * 4 * 8)  # block1 at 8x8, block2 at 4x4 (after the pool)
    assert flops["Conv2D"][0] == conv
    assert flops["Conv2D"][1] == 2 * conv - 2 * 5 * 8 * 8 * 9 * 3 * 4  # the first conv computes no dx
    lin = 2 * 5 * (2 * 2 * 8 * 16 + 16 * 3)
    assert flops["Linear"] == [lin, 2 * lin]
    assert {type(m) for m in model.layers()} >= {Conv2D, Linear}


def test_workers_write_csv_json_png(tmp_path):
    out = tmp_path / "bench-out"
    proc = run_cli(["--workers", "1,2", "--json", "--images", "200", "--data-dir", str(tmp_path / "data"),
                    "--out", str(out), *TINY], tmp_path, timeout=180)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["workers"] for r in rows] == [1, 2]
    for r in rows:
        assert r["images_per_s"] > 0 and r["impl"] == "dptrain" and r["transport"] == "shm"
        assert 0 <= r["coordinator_frac"] <= 1 and r["compute_s"] > 0
    assert rows[0]["speedup"] == 1.0
    with open(out / "bench.csv") as f:
        assert [int(r["workers"]) for r in csv.DictReader(f)] == [1, 2]
    assert len(json.loads((out / "bench.json").read_text())) == 2
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_workers_auto_is_the_physical_core_count(tmp_path):
    """`--workers auto` (bench and launch) means one worker per physical core."""
    import argparse

    import pytest

    from dptrain.distributed.session import physical_cores
    from dptrain.flags import worker_count
    assert worker_count("auto") == physical_cores() >= 1
    assert worker_count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="integer or auto"):
        worker_count("many")


def test_scaling_plot_marks_the_cores_and_the_ideal_curve(tmp_path, monkeypatch):
    """The plot draws the ideal min(N, cores) curve and a line at the core count, and says which N exceed it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dptrain.bench import report as bench
    rows = [{"impl": "dptrain", "transport": "shm", "workers": n, "images_per_s": ips, "efficiency": e}
            for n, ips, e in ((1, 100.0, 1.0), (2, 180.0, 0.9), (4, 170.0, 0.425))]
    monkeypatch.setattr(bench, "physical_cores", lambda: 2)
    seen = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, path, **kw):
        seen["title"] = fig._suptitle.get_text()
        seen["ideal"] = [line.get_ydata() for ax in fig.axes for line in ax.get_lines()
                         if line.get_label().startswith("ideal")]
        return real_savefig(fig, path, **kw)
    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    bench.plot_scaling(rows, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "2 physical cores" in seen["title"] and "N = 4 exceed" in seen["title"]
    assert list(seen["ideal"][0]) == [100.0, 200.0, 200.0]  # images/s: flat beyond the cores
    assert list(seen["ideal"][1]) == [1.0, 1.0, 0.5]


def test_rounds_alternate_the_order_and_pair_the_ratios(tmp_path, monkeypatch, capsys):
    """--rounds R: every N measured R times, the order reversed each round (ABBA); a row's img/s is the median of its
    rounds and its speedup the median of each round's own ratio to the smallest N (a machine slowing down between
    rounds does not move it)."""
    import argparse

    from dptrain.bench import command as bench, workers as bench_dist
    order, clock = [], iter(range(100))

    def fake_run(n, data, out, args, overrides, transport):
        t = next(clock)
        order.append(n)
        speed = 1.0 / (1 + 0.1 * t)  # the machine slows down with every run
        return {"impl": "dptrain", "transport": transport, "workers": n, "images_per_s": 100.0 * n ** 0.5 * speed,
                "coordinator_frac": 0.01, "pss_total_mb": None, "run": t}
    monkeypatch.setattr(bench_dist, "run_workers", fake_run)
    monkeypatch.setattr(bench_dist, "synth_dataset", lambda *a: tmp_path)
    monkeypatch.setattr(bench, "write_outputs", lambda rows, out: None)
    p = argparse.ArgumentParser()
    bench.add_bench_flags(p)
    args = p.parse_args(["--workers", "1,4", "--rounds", "3", "--json", "--out", str(tmp_path / "o")])
    args.steps, args.batch_size, args.image_size = 10, 64, 64
    assert bench.run_dist(args, None, {}) == 0
    assert order == [1, 4, 4, 1, 1, 4]
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    one, four = rows
    assert four["rounds"] == 3 and len(four["images_per_s_rounds"]) == 3
    assert four["images_per_s"] == sorted(four["images_per_s_rounds"])[1]
    ratios = [a / b for a, b in zip(four["images_per_s_rounds"], one["images_per_s_rounds"])]
    assert four["speedup_rounds"] == ratios and four["speedup"] == sorted(ratios)[1]
    assert four["run"] in (1, 2, 5) and four["images_per_s"] == 100.0 * 2 / (1 + 0.1 * four["run"])
    args.rounds = 0
    with pytest.raises(SystemExit, match="rounds"):
        bench.run_dist(args, None, {})


def test_rounds_pair_dptrain_with_its_ddp_run(tmp_path, monkeypatch, capsys):
    """--compare torch --rounds R: each N's DDP run sits next to its dptrain run in every round (the pair's order
    reversed in odd rounds) and vs torch is the median of the rounds' own ratios."""
    import argparse

    from dptrain.bench import command as bench, ddp as bench_ddp, workers as bench_dist
    from dptrain.nn import torch_ref
    order, clock = [], iter(range(100))

    def speed():
        return 1.0 / (1 + 0.2 * next(clock))  # the machine slows down with every run

    def fake_ours(n, data, out, args, overrides, transport):
        order.append(("dptrain", n))
        return {"impl": "dptrain", "transport": transport, "workers": n, "images_per_s": 150.0 * speed(),
                "coordinator_frac": 0.01, "pss_total_mb": None}

    def fake_ddp(n, *a, **k):
        order.append(("ddp", n))
        return {"impl": "torch-ddp", "transport": "gloo", "workers": n, "images_per_s": 100.0 * speed()}
    monkeypatch.setattr(bench_dist, "run_workers", fake_ours)
    monkeypatch.setattr(bench_dist, "synth_dataset", lambda *a: tmp_path)
    monkeypatch.setattr(bench_ddp, "run_ddp", fake_ddp)
    monkeypatch.setattr(torch_ref, "require_torch", lambda: None)
    monkeypatch.setattr(bench, "write_outputs", lambda rows, out: None)
    monkeypatch.setattr(bench.config_mod, "to_dict", lambda cfg: {"model": {}})
    p = argparse.ArgumentParser()
    bench.add_bench_flags(p)
    args = p.parse_args(["--workers", "2", "--compare", "torch", "--rounds", "2", "--json", "--out",
                         str(tmp_path / "o")])
    args.steps, args.batch_size, args.image_size = 10, 64, 64
    assert bench.run_dist(args, None, {}) == 0
    assert order == [("dptrain", 2), ("ddp", 2), ("ddp", 2), ("dptrain", 2)]
    ours, theirs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert theirs["impl"] == "torch-ddp" and theirs["rounds"] == 2
    ratios = [a / b for a, b in zip(ours["images_per_s_rounds"], theirs["images_per_s_rounds"])]
    assert ours["vs_torch_rounds"] == ratios and ours["vs_torch"] == pytest.approx(sum(ratios) / 2)
    assert ratios == pytest.approx([1.5 * 1.2, 1.5 * 1.4 / 1.6])  # drift within each pair only


def test_single_process_rounds(tmp_path, monkeypatch):
    """The single-process bench with --rounds: ours and PyTorch's timed in turn, the pair reversed every other round;
    the ratio is the median of each round's own; a real run of the tiny model reports every round."""
    from dptrain.bench import local as bench_local
    order, clock = [], iter(range(100))

    def fake(side, ips):
        def run(*a, **k):
            order.append(side)
            speed = ips / (1 + 0.2 * next(clock))  # the machine slows down with every run
            return {"images_per_s": speed, "step_ms": 64e3 / speed, "torch_version": "x", "layers_ms": {},
                    "side": side}
        return run
    monkeypatch.setattr(bench_local, "time_numpy", fake("ours", 150.0))
    monkeypatch.setattr(bench_local, "time_torch", fake("torch", 100.0))
    monkeypatch.setattr(bench_local, "gemm_peak_gflops", lambda threads: 100.0)
    monkeypatch.setattr("dptrain.nn.torch_ref.require_torch", lambda: None)
    from dptrain.config import Config
    r = bench_local.run_local_bench(Config(), 10, 1, 0, 2, True, progress=False, rounds=3)
    assert order == ["ours", "torch", "torch", "ours", "ours", "torch"]
    ratios = [1.5 * 1.2, 1.5 * 1.4 / 1.6, 1.5 * 2.0 / 1.8]  # each round's pair: the drift between its two runs only
    assert r["ratio_rounds"] == pytest.approx(ratios) and r["ratio_vs_torch"] == pytest.approx(sorted(ratios)[1])
    assert r["rounds"] == 3 and r["images_per_s"] == sorted(r["images_per_s_rounds"])[1]
    proc = run_cli(["--rounds", "2", *TINY], tmp_path)
    assert "2 rounds, img/s: dptrain" in proc.stdout


def test_pss_is_sampled_during_the_warm_up_only(tmp_path):
    """The PSS sampler stops for good once the timed steps begin (a sample costs the cores ~0.15 s at N = 8), and
    counts the steps from the run's metrics.jsonl as they are appended."""
    from dptrain.bench.workers import PssSampler, steps_recorded
    metrics = tmp_path / "metrics.jsonl"
    assert steps_recorded(metrics) == 0
    sampler = PssSampler(0, 0.01, until=lambda: steps_recorded(metrics) >= 2)
    taken = []
    sampler.sample = lambda: taken.append(steps_recorded(metrics))
    sampler.start()
    for step in range(4):
        time.sleep(0.1)
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step, "step_s": 0.1}) + "\n")
    time.sleep(0.1)
    assert not sampler.is_alive()
    sampler.stop()
    assert taken and set(taken) == {0, 1}  # samples before and during the warm-up, none after it


@pytest.mark.timeout(240)
def test_ceiling_runs_the_shards_with_nothing_to_exchange(tmp_path):
    """--ceiling: beside each N's launch, N real processes compute shards of batch // N for a common window with
    nothing exchanged; each dptrain row says which share of that it reached (paired in the same round)."""
    proc = run_cli(["--workers", "1,2", "--ceiling", "--ceiling-s", "1", "--json", "--images", "200",
                    "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"), *TINY], tmp_path, timeout=220)
    rows = {(r["impl"], r["workers"]): r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {("dptrain", 1), ("dptrain", 2), ("ceiling", 1), ("ceiling", 2)}
    for n in (1, 2):
        ceiling, ours = rows[("ceiling", n)], rows[("dptrain", n)]
        assert ceiling["images_per_s"] > 0 and ceiling["window_s"] >= 1 and ceiling["shard"] == 16 // n
        assert ours["of_ceiling"] == pytest.approx(ours["images_per_s"] / ceiling["images_per_s"])
    assert not [p for p in psutil.process_iter(["cmdline"]) if "--ceiling-child" in (p.info["cmdline"] or [])]
