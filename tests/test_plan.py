"""`dptrain plan`: the cost model's formulas and invariants (pure, no timing), the bandwidth parser, the calibration
cache, --validate against measured rows, and the command line as a user runs it (a subprocess, a private cache)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dptrain import config as config_mod, plan
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore
from dptrain.plan import CostModel, parse_bandwidth, predict

P = 9_434_462  # the default model at 64x64, 62 classes
MODEL = CostModel(ms_per_image=10.0, ms_per_step=20.0)
GBIT = 1e9


def run(plane, hosts, slots=8, batch=4096, bps=10 * GBIT, wire=4, params=P, model=MODEL):
    return predict(plane, hosts, slots, batch, bps, wire, params, model)


# ---------------------------------------------------------------------------------------------- bandwidth strings

@pytest.mark.parametrize("text, bps", [("10gbit", 10e9), ("25Gbit", 25e9), ("1g", 1e9), ("100mbit", 1e8),
                                       ("1e9", 1e9), ("2.5 Gbit/s", 2.5e9), ("10gbits", 10e9), ("500kbit", 5e5),
                                       ("1tbit", 1e12), (1e9, 1e9), (100, 100.0)])
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize("text, words", [("10gbps", "ambiguous"), ("1GB/s", "ambiguous"), ("10GB", "ambiguous"),
                                         ("fast", "expected bits per second"), ("", "expected"), ("-1g", "expected"),
                                         ("0", "positive"), ("1e999", "finite"), ("nan", "expected"),
                                         ("10 gbit gbit", "expected"), (True, "expected")])
def test_parse_bandwidth_refuses_with_a_reason(text, words):
    with pytest.raises(ValueError, match=words) as e:
        parse_bandwidth(text)
    assert repr(text) in str(e.value)  # the message names what was given


# ---------------------------------------------------------------------------------------------- the formulas

def test_star_by_hand():
    r = run("star", 16, bps=8e9, wire=4)  # 1 GB/s: easy numbers
    M = 4 * P
    assert r["comm_s"] == pytest.approx(2 * 16 * M / 1e9 + 2 * 50e-6)
    assert r["comm_exposed_s"] == r["comm_s"]
    assert r["update_s"] == pytest.approx(P * 4e-9)
    assert r["per_worker_batch"] == 32 and r["compute_s"] == pytest.approx((20 + 32 * 10) / 1e3)
    assert r["local_reduce_s"] == pytest.approx(8 * 4 * P / 5e9)
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["local_reduce_s"] + r["comm_s"] + r["update_s"])
    assert r["images_per_s"] == pytest.approx(4096 / r["step_s"])
    assert (r["host_send_bytes"], r["host_recv_bytes"]) == (M, M)
    assert (r["coord_in_bytes"], r["coord_out_bytes"]) == (16 * M, 16 * M)


def test_star_with_a_fatter_coordinator_link_or_a_cpu_cap():
    M = 4 * P
    fat = run("star", 4, bps=8e9, model=dataclasses.replace(MODEL, coord_link_ratio=10.0))
    assert fat["comm_s"] == pytest.approx(2 * M / 1e9 + 2 * 50e-6)  # the hosts' own links are the limit
    half = run("star", 4, bps=8e9, model=dataclasses.replace(MODEL, coord_link_ratio=2.0))
    assert half["comm_s"] == pytest.approx(2 * 4 * M / 2e9 + 2 * 50e-6)
    capped = dataclasses.replace(MODEL, wire_cpu_bytes_per_s=0.5e9)
    assert run("star", 4, bps=8e9, model=capped)["comm_s"] == pytest.approx(2 * 4 * M / 0.5e9 + 2 * 50e-6)
    assert run("mesh", 4, bps=8e9, model=capped)["comm_s"] == pytest.approx(2 * 0.75 * M / 0.5e9 + 8 * 50e-6)
    assert run("ddp", 4, bps=8e9, model=capped)["comm_s"] == run("ddp", 4, bps=8e9)["comm_s"]  # gloo: no CURVE
    assert run("mesh", 4, model=dataclasses.replace(MODEL, coord_link_ratio=4.0))["coord_link_s"] == pytest.approx(
        M / (4 * 10e9 / 8))


def test_mesh_by_hand_and_overlap():
    M, H, a, bw = 2 * P, 4, 50e-6, 1e9
    r = run("mesh", H, bps=8e9, wire=2)
    rs = (H - 1) / H * M / bw + (H - 1) * a
    assert r["reduce_scatter_s"] == pytest.approx(rs)
    assert r["comm_s"] == pytest.approx(2 * (H - 1) / H * M / bw + 2 * (H - 1) * a + 2 * a)
    assert r["update_s"] == pytest.approx(P * 4e-9 / H)
    assert r["coord_in_bytes"] == M and r["coord_out_bytes"] == 0
    # overlap hides at most the reduce-scatter, never the all-gather
    some = run("mesh", H, bps=8e9, wire=2, model=dataclasses.replace(MODEL, overlap=0.01))
    assert some["comm_hidden_s"] == pytest.approx(0.01 * some["compute_s"])
    full = run("mesh", H, bps=8e9, wire=2, model=dataclasses.replace(MODEL, overlap=1.0))
    assert full["comm_hidden_s"] == pytest.approx(rs)
    assert full["comm_exposed_s"] == pytest.approx(r["comm_s"] - rs)


def test_ddp_by_hand_and_its_own_overlap():
    M, H = 4 * P, 8
    r = run("ddp", H, bps=8e9)
    assert r["comm_s"] == pytest.approx(2 * (H - 1) / H * M / 1e9 + 2 * (H - 1) * 50e-6)
    assert r["coord_in_bytes"] == 0 and r["update_s"] == pytest.approx(P * 4e-9)
    same = run("ddp", H, model=dataclasses.replace(MODEL, overlap=0.5))
    own = run("ddp", H, model=dataclasses.replace(MODEL, overlap=0.5, overlap_ddp=0.0))
    assert same["comm_hidden_s"] > 0 and own["comm_hidden_s"] == 0
    assert run("ddp", 1)["comm_s"] == 0  # one host: nothing to all-reduce


@pytest.mark.parametrize("plane", plan.PLANES)
def test_monotonic_in_bandwidth(plane):
    for hosts in (1, 2, 16, 64):
        rows = [run(plane, hosts, bps=b * GBIT) for b in (0.1, 1, 10, 25, 100)]
        steps = [r["step_s"] for r in rows]
        assert steps == sorted(steps, reverse=True)
        if hosts > 1 or plane == "star":
            comms = [r["comm_s"] for r in rows]
            assert all(x > y for x, y in zip(comms, comms[1:]))


def test_star_grows_with_hosts_mesh_links_stay_flat():
    hosts = [1, 2, 4, 16, 64, 256]
    star = [run("star", h) for h in hosts]
    assert all(x["comm_s"] < y["comm_s"] for x, y in zip(star, star[1:]))
    assert all(x["coord_in_bytes"] < y["coord_in_bytes"] for x, y in zip(star, star[1:]))
    M = 4 * P
    for plane in ("mesh", "ddp"):
        rows = [run(plane, h) for h in hosts]
        assert all(r["host_send_bytes"] <= 2 * M and r["host_recv_bytes"] <= 2 * M for r in rows)
        assert rows[-2]["host_send_bytes"] == pytest.approx(rows[-1]["host_send_bytes"], rel=0.03)  # 64 vs 256
        no_latency = [run(plane, h, model=dataclasses.replace(MODEL, latency_s=0.0)) for h in (64, 256)]
        assert no_latency[0]["comm_s"] == pytest.approx(no_latency[1]["comm_s"], rel=0.03)  # bytes: flat
        # what grows is the per-message latency: H - 1 messages each way
        assert rows[-1]["comm_s"] - rows[-2]["comm_s"] == pytest.approx(
            (no_latency[1]["comm_s"] - no_latency[0]["comm_s"]) + 2 * (256 - 64) * 50e-6)
    assert all(r["coord_in_bytes"] == M for r in (run("mesh", h) for h in hosts))  # the slices: M in all


@pytest.mark.parametrize("plane", plan.PLANES)
def test_float16_halves_the_bytes(plane):
    a, b = run(plane, 16, wire=4), run(plane, 16, wire=2)
    for k in ("model_bytes", "host_send_bytes", "host_recv_bytes", "coord_in_bytes", "coord_out_bytes"):
        assert b[k] == pytest.approx(a[k] / 2)
    zero_latency = dataclasses.replace(MODEL, latency_s=0.0)
    assert run(plane, 16, wire=2, model=zero_latency)["comm_s"] == pytest.approx(
        run(plane, 16, wire=4, model=zero_latency)["comm_s"] / 2)
    # the local sum stays float32
    assert a["local_reduce_s"] == b["local_reduce_s"]


def test_per_worker_batch_and_idle_workers():
    assert plan.per_worker_batch(4096, 16, 8) == 32
    assert plan.per_worker_batch(4097, 16, 8) == 33
    assert plan.per_worker_batch(64, 64, 8) == 1
    r = run("mesh", 64, batch=64)
    assert r["idle_workers"] == 64 * 8 - 64 and r["per_worker_batch"] == 1
    assert run("mesh", 1, slots=1)["local_reduce_s"] == 0  # one slot: nothing to sum locally


def test_mesh_is_bounded_by_the_coordinator_link():
    # With equal links the hosts' own all-gather + reduce-scatter (2(H-1)/H·M) outweighs the M into the coordinator
    # unless there is no mesh traffic at all: one host on a slow link
    r = run("mesh", 1, bps=1e6)
    assert r["coord_bound"] and r["step_s"] == pytest.approx(r["coord_link_s"]) == pytest.approx(4 * P * 8 / 1e6)
    assert not run("mesh", 8)["coord_bound"]


@settings(max_examples=300, deadline=None)
@given(plane=st.sampled_from(plan.PLANES), hosts=st.integers(1, 512), slots=st.integers(1, 64),
       batch=st.integers(1, 1 << 16), gbit=st.floats(0.001, 400), wire=st.sampled_from([2, 4]),
       params=st.integers(1, 10**9), per_image=st.floats(1e-3, 1e3), per_step=st.floats(0, 1e3),
       latency=st.floats(0, 1e-2), upd=st.floats(0, 100), mem=st.floats(1e8, 1e11), overlap=st.floats(0, 1),
       eff=st.floats(0.1, 1), ratio=st.floats(0.1, 100), cap=st.none() | st.floats(1e6, 1e11))
def test_efficiency_never_exceeds_one(plane, hosts, slots, batch, gbit, wire, params, per_image, per_step, latency,
                                      upd, mem, overlap, eff, ratio, cap):
    m = CostModel(ms_per_image=per_image, ms_per_step=per_step, latency_s=latency, link_efficiency=eff,
                  update_ns_per_param=upd, mem_bytes_per_s=mem, overlap=overlap, coord_link_ratio=ratio,
                  wire_cpu_bytes_per_s=cap)
    r = predict(plane, hosts, slots, batch, gbit * GBIT, wire, params, m)
    assert 0 < r["efficiency"] <= 1 + 1e-9
    assert 0 <= r["comm_exposed_s"] <= r["comm_s"] + 1e-15
    assert r["step_s"] >= r["compute_s"]
    assert math.isclose(r["speedup"], hosts * r["efficiency"])


def test_predict_refuses_bad_input():
    for kwargs, words in (({"plane": "ring"}, "plane"), ({"wire": 3}, "wire_bytes"), ({"hosts": 0}, "hosts"),
                          ({"slots": 1.5}, "slots"), ({"bps": 0.0}, "bandwidth"), ({"bps": math.inf}, "bandwidth")):
        args = {"plane": "mesh", "hosts": 4, **kwargs}
        with pytest.raises(ValueError, match=words):
            run(args.pop("plane"), args.pop("hosts"), **args)
    for kwargs in ({"overlap": 1.5}, {"latency_s": -1.0}, {"ms_per_image": 0.0}, {"mem_bytes_per_s": 0.0},
                   {"coord_link_ratio": 0.0}, {"wire_cpu_bytes_per_s": 0.0}, {"overlap_ddp": -0.1},
                   {"update_ns_per_param": math.nan}):
        with pytest.raises(ValueError):
            CostModel(**{"ms_per_image": 1.0, **kwargs})


# ---------------------------------------------------------------------------------------------- model size, compute

def test_count_params_matches_a_built_model():
    cfg = config_mod.load(None, {})
    assert plan.count_params(cfg, 62) == P
    small = config_mod.load(None, {"model.widths": "[8,16]", "data.image_size": "32"})
    store = ParamStore(np.float32)
    build_model(small.model, 10, 32, store, rng=np.random.default_rng(0))
    assert plan.count_params(small, 10) == store.num_params == store.params.size


def test_fit_affine():
    assert plan.fit_affine({2: 40.0, 32: 340.0}) == pytest.approx((20.0, 10.0))
    assert plan.fit_affine({2: 10.0, 32: 320.0}) == pytest.approx((0.0, 10.0))  # a negative fixed part: dropped
    assert plan.fit_affine({2: 40.0, 32: 32.0}) == pytest.approx((0.0, 1.0))  # a negative slope: per image only


TINY = {"model.widths": "[8,16]", "model.res_width": "16", "model.hidden": "32", "data.image_size": "32"}


def test_calibrate_times_the_real_model():
    entry = plan.calibrate(config_mod.load(None, TINY), 10, batches=(2, 8), warmup=1, steps=2)
    assert entry["ms_per_image"] > 0 and entry["ms_per_step"] >= 0
    assert set(entry["measured_ms"]) == {"2", "8"} and entry["batches"] == [2, 8]
    assert entry["cpu_model"] == plan.cpu_model() and entry["model"]["widths"] == [8, 16]


def test_calibration_cache_is_keyed_by_cpu_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path))
    calls = []

    def fake(cfg, classes, **kw):
        calls.append(cfg.model.widths)
        return {**plan._key(cfg, classes, plan.cpu_model()), "ms_per_step": 1.0, "ms_per_image": 2.0 * len(calls),
                "batches": [2, 32], "created": "now"}
    monkeypatch.setattr(plan, "calibrate", fake)
    args = type("A", (), {"compute_ms_per_image": None, "compute_ms_per_step": 0.0, "calibrate": False})
    small = config_mod.load(None, TINY)
    assert plan.compute_source(args, small, 10)[:2] == (1.0, 2.0)  # nothing cached: calibrates and saves
    assert plan.compute_source(args, small, 10)[:2] == (1.0, 2.0) and len(calls) == 1  # cached
    assert plan.compute_source(args, config_mod.load(None, {}), 62)[1] == 4.0 and len(calls) == 2  # other model
    assert plan.compute_source(args, small, 11)[1] == 6.0  # other classes
    args.calibrate = True
    assert plan.compute_source(args, small, 10)[1] == 8.0  # --calibrate: again, and it replaces the entry
    args.calibrate = False
    assert plan.compute_source(args, small, 10)[1] == 8.0 and len(calls) == 4
    saved = json.loads((tmp_path / plan.CALIBRATION_FILE).read_text())["entries"]
    assert len(saved) == 3 and all(e["cpu_model"] == plan.cpu_model() for e in saved)
    (tmp_path / plan.CALIBRATION_FILE).write_text("{not json")
    assert plan.compute_source(args, small, 10)[1] == 10.0  # unreadable cache: calibrate again
    args.compute_ms_per_image, args.compute_ms_per_step = 7.0, 3.0
    assert plan.compute_source(args, small, 10) == (3.0, 7.0, "given")


# ---------------------------------------------------------------------------------------------- --validate

def test_validate_rows():
    exact = run("mesh", 4, slots=2, batch=64, bps=GBIT, wire=2)
    rows = [
        {"hosts": 4, "slots": 2, "rate": "1gbit", "wire_dtype": "float16", "plane": "mesh", "batch_size": 64,
         "step_s": exact["step_s"], "comm_s": exact["comm_exposed_s"], "compute_s": exact["compute_s"],
         "images_per_s": 1.0, "something_new": [1, 2]},
        {"hosts": 2, "slots": 2, "rate": 1e9, "wire_dtype": "float32", "plane": "star", "batch_size": 64,
         "step_s": 2 * run("star", 2, slots=2, batch=64, bps=GBIT)["step_s"], "comm_s": 0.0},
        {"hosts": 2, "slots": 2, "rate": None, "plane": "mesh", "batch_size": 64, "step_s": 1.0},
        {"hosts": 2, "slots": 2, "rate": "1gbit", "plane": "ring", "batch_size": 64, "step_s": 1.0},
        {"hosts": 2, "rate": "1gbit", "plane": "mesh", "step_s": 1.0},
    ]
    v = plan.validate(rows, P, MODEL, None)
    assert [s["row"] for s in v["skipped"]] == [2, 3, 4]
    assert "not shaped" in v["skipped"][0]["reason"] and "ring" in v["skipped"][1]["reason"]
    assert "slots" in v["skipped"][2]["reason"] and "batch_size" in v["skipped"][2]["reason"]
    first, second = v["rows"]
    assert first["step_err"] == pytest.approx(0) and first["comm_err"] == pytest.approx(0)
    assert first["pred_step_given_compute_s"] == pytest.approx(exact["step_s"])
    assert second["step_err"] == pytest.approx(-0.5) and second["comm_err"] is None
    assert v["mean_abs_step_err"] == pytest.approx(0.25)
    assert len(plan.validate(rows, P, MODEL, GBIT)["rows"]) == 3  # --bandwidth fills a missing rate
    with pytest.raises(ValueError, match="list"):
        plan.validate({"rows": []}, P, MODEL, None)


def test_parse_tc_rate():
    assert plan.parse_tc_rate("1gbit") == 1e9 and plan.parse_tc_rate("125mbps") == 1e9  # tc: mbps = MB/s
    assert plan.parse_tc_rate(1e9) == 1e9
    assert all(plan.parse_tc_rate(r) is None for r in ("off", "none", None, "", 0, "0"))
    with pytest.raises(ValueError):
        plan.parse_tc_rate("fast")


def bench_hosts_row(**kw):
    """A row as `dptrain bench --hosts` writes it into bench-hosts.json."""
    return {"hosts": 2, "slots": 1, "workers": 2, "rate": "1gbit", "batch_size": 64, "warmup": 2, "steps": 5,
            "threads": 1, "overrides": "--dist.plane=star", "dptrain_step_s": 1.9, "dptrain_images_per_s": 33.7,
            "dptrain_comm_s": 0.7, "dptrain_comm_all_s": 0.8, "dptrain_compute_s": 1.1, "h1_out_mb": 77.0,
            "h1_in_mb": 76.5, "h2_out_mb": 38.3, "h2_in_mb": 38.5, "ddp_step_s": 1.5, "ddp_images_per_s": 42.7,
            "ddp_nosync_s": 1.2, "ddp_comm_s": 0.3, "ddp_h2_out_mb": 39.0, "ddp_h2_in_mb": 39.0,
            "dptrain_vs_ddp": 0.79, **kw}


def test_validate_bench_hosts_rows():
    rows = [bench_hosts_row(),
            bench_hosts_row(hosts=3, rate="125mbps", overrides="--dist.plane=mesh --dist.wire_dtype=float16 "
                            "--model.widths=[8,16] --model.res_width=16", ddp_step_s=None),
            bench_hosts_row(rate="off"),
            {"hosts": 5, "slots": 1, "rate": "1gbit", "batch_size": 64, "overrides": "", "error": "ssh refused"}]
    seen = []

    def params_for(ov):
        seen.append(ov)
        return 1000
    v = plan.validate(rows, P, MODEL, None, params_for)
    star, ddp, mesh = v["rows"]
    assert (star["source"], star["plane"], star["wire_dtype"], star["row"]) == ("dptrain", "star", "float32", 0)
    assert (ddp["source"], ddp["plane"], ddp["row"]) == ("ddp", "ddp", 0)
    assert (mesh["plane"], mesh["wire_dtype"], mesh["hosts"], mesh["bandwidth_bps"]) == ("mesh", "float16", 3, 1e9)
    assert seen == [{"model.widths": "[8,16]", "model.res_width": "16"}] and mesh["num_params"] == 1000
    want = run("star", 2, slots=1, batch=64, bps=1e9)
    assert star["pred_step_s"] == pytest.approx(want["step_s"]) and star["step_s"] == 1.9
    assert star["pred_coord_in_mb"] == pytest.approx(2 * 4 * P / 1e6) and star["coord_in_mb"] == 76.5
    assert star["pred_host_out_mb"] == pytest.approx(4 * P / 1e6) and star["host_out_mb"] == 38.3
    assert star["pred_step_given_compute_s"] == pytest.approx(want["step_s"] - want["compute_s"] + 1.1)
    assert ddp["comm_s"] == 0.3 and ddp["host_out_mb"] == 39.0 and "pred_step_given_compute_s" not in ddp
    assert [(s["row"], s["reason"].split(" (")[0]) for s in v["skipped"]] == [
        (2, "link not shaped"), (2, "link not shaped"), (3, "the bench failed: ssh refused")]
    assert len(plan.validate(rows, P, MODEL, 1e9)["rows"]) == 5  # an unshaped link: --bandwidth assumed
    text = plan.format_validation(v)
    assert "ssh refused" in text and text.count("\nstar ") == 1 and "mean |step error|" in text


def test_read_rows_list_or_lines(tmp_path):
    rows = [bench_hosts_row(), bench_hosts_row(hosts=3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text("{oops")
    assert plan.read_rows(tmp_path / "a.json") == plan.read_rows(tmp_path / "b.jsonl") == rows
    with pytest.raises(ValueError, match="JSON"):
        plan.read_rows(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------- the command line

def dptrain(*args, cache):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", DPTRAIN_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "dptrain", "plan", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_json(tmp_path):
    r = dptrain("--hosts", "4,1,16", "--slots", 8, "--bandwidth", "10gbit,25gbit", "--batch-size", 4096,
                "--compute-ms-per-image", 10, "--compute-ms-per-step", 20, "--wire-dtype", "float16", "--json",
                cache=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout is one JSON object
    assert out["num_params"] == P and out["wire_dtype"] == "float16" and out["batch"] == 4096
    assert [(row["bandwidth_bps"], row["plane"], row["hosts"]) for row in out["rows"]] == [
        (b, p, h) for b in (10e9, 25e9) for p in plan.PLANES for h in (1, 4, 16)]
    for row in out["rows"]:
        want = predict(row["plane"], row["hosts"], 8, 4096, row["bandwidth_bps"], 2, P,
                       CostModel(ms_per_image=10, ms_per_step=20))
        assert row == pytest.approx(want)
    assert not list(tmp_path.iterdir())  # given compute: nothing calibrated, nothing cached


def test_cli_table_model_overrides_and_calibration(tmp_path):
    r = dptrain("--hosts", "1,2", "--slots", 2, "--bandwidth", "1g", "--plane", "mesh", "--model.widths=[8,16]",
                "--model.res_width", 16, "--model.hidden=32", "--image-size", 32, "--classes", 10, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    small = config_mod.load(None, TINY)
    assert f"{plan.count_params(small, 10):,} params" in r.stdout
    assert "calibrated now" in r.stdout and (tmp_path / plan.CALIBRATION_FILE).exists()
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("mesh")]
    assert [ln[2] for ln in lines] == ["1", "2"]
    again = dptrain("--hosts", "2", "--slots", 2, "--bandwidth", "1g", "--model.widths=[8,16]", "--model.res_width",
                    16, "--model.hidden=32", "--image-size", 32, "--classes", 10, cache=tmp_path)
    assert again.returncode == 0 and "calibration of" in again.stdout and "calibrating" not in again.stderr


def test_cli_validate(tmp_path):
    f = tmp_path / "bench-hosts.json"
    f.write_text(json.dumps([{"hosts": 2, "slots": 2, "rate": "1gbit", "wire_dtype": "float32", "plane": "star",
                              "batch_size": 64, "step_s": 1.0, "comm_s": 0.5, "extra": "ok"}]))
    r = dptrain("--validate", f, "--compute-ms-per-image", 10, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mean |step error|" in r.stdout and "star" in r.stdout
    j = dptrain("--validate", f, "--compute-ms-per-image", 10, "--json", cache=tmp_path)
    assert json.loads(j.stdout)["rows"][0]["step_s"] == 1.0
    # a bench-hosts.json row measured with another model: its parameter count from its own overrides
    f.write_text(json.dumps([bench_hosts_row(overrides="--dist.plane=mesh --model.widths=[8,16] --model.hidden=32 "
                                             "--data.image_size=32")]))
    j = dptrain("--validate", f, "--compute-ms-per-image", 10, "--json", cache=tmp_path)
    assert j.returncode == 0, j.stderr
    small = config_mod.load(None, {"model.widths": "[8,16]", "model.hidden": "32", "data.image_size": "32"})
    assert [(r["plane"], r["num_params"]) for r in json.loads(j.stdout)["rows"]] == [
        ("mesh", plan.count_params(small, 62)), ("ddp", plan.count_params(small, 62))]


@pytest.mark.parametrize("argv, words", [
    (["--hosts", "2", "--slots", "2", "--bandwidth", "10gbps"], "ambiguous"),
    (["--hosts", "2", "--slots", "2"], "required"),
    (["--hosts", "0", "--slots", "2", "--bandwidth", "1g"], "host counts >= 1"),
    (["--hosts", "a", "--slots", "2", "--bandwidth", "1g"], "comma list"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--plane", "ring"], "--plane"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--overlap", "2"], "overlap"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--model.nope=1"], "unknown config key"),
    (["--validate", "/nonexistent/rows.json"], "rows.json"),
])
def test_cli_errors_name_the_problem(tmp_path, argv, words):
    r = dptrain(*argv, "--compute-ms-per-image", 10, cache=tmp_path)
    assert r.returncode != 0 and words in r.stderr
    assert "Traceback" not in r.stderr
