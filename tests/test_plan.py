"""`dptrain plan`: the cost model's formulas and invariants (pure, no timing), the bandwidth parser, the calibration
cache, --validate against measured rows, and the command line as a user runs it (a subprocess, a private cache)."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dptrain import config as config_mod
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore
from dptrain.plan import calibration as plan_calibration, command as plan_cli, model as plan, validate as plan_validate
from dptrain.plan.model import CostModel, parse_bandwidth, predict

P = 9_434_462  # the default model at 64x64, 62 classes
# the bare model the by-hand formulas are written for: full line rate, no overlap, plain links (no CURVE)
MODEL = CostModel(ms_per_image=10.0, ms_per_step=20.0, link_efficiency=1.0, overlap=0.0, overlap_ddp=None,
                  curve_bytes_per_cpu_s=None)
GBIT = 1e9
BENCH = Path(__file__).resolve().parent.parent / "bench" / "netns-2026-11-26"


def run(plane, hosts, slots=8, batch=4096, bps=10 * GBIT, wire=4, params=P, model=MODEL, sync_every=10):
    return predict(plane, hosts, slots, batch, bps, wire, params, model, sync_every)


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


def test_star_with_a_fatter_coordinator_link_or_curve():
    M = 4 * P
    fat = run("star", 4, bps=8e9, model=dataclasses.replace(MODEL, coord_link_ratio=10.0))
    assert fat["comm_s"] == pytest.approx(2 * M / 1e9 + 2 * 50e-6)  # the hosts' own links are the limit
    half = run("star", 4, bps=8e9, model=dataclasses.replace(MODEL, coord_link_ratio=2.0))
    assert half["comm_s"] == pytest.approx(2 * 4 * M / 2e9 + 2 * 50e-6)
    # CURVE: the coordinator seals and opens 4·M each way on its I/O thread, after the wire
    curve = dataclasses.replace(MODEL, curve_bytes_per_cpu_s=0.5e9)
    assert run("star", 4, bps=8e9, model=curve)["comm_s"] == pytest.approx(2 * 4 * M / 1e9 + 2 * 50e-6 + 4 * M / 0.5e9)
    assert run("ddp", 4, bps=8e9, model=curve)["comm_s"] == run("ddp", 4, bps=8e9)["comm_s"]  # gloo: no CURVE


def test_mesh_by_hand_and_overlap():
    M, M32, H, a, bw, k = 2 * P, 4 * P, 4, 50e-6, 1e9, 10
    whole = dataclasses.replace(MODEL, overlap_forward=0.0)  # the agent takes the whole all-gather first
    r = run("mesh", H, bps=8e9, wire=2, model=whole)
    rs = (H - 1) / H * M / bw + (H - 1) * a
    sync = 2 * M32 / (H * k) / bw
    f16 = P * (3.2 * (1 + 1 / H) + 2 * 2.6) * 1e-9  # plain links: the float16 work is all the wire CPU
    assert r["reduce_scatter_s"] == r["all_gather_s"] == pytest.approx(rs)
    assert r["sync_s"] == pytest.approx(sync) and r["wire_cpu_s"] == pytest.approx(f16)
    assert r["comm_s"] == pytest.approx(2 * rs + sync + f16 + 2 * a)
    assert r["update_s"] == pytest.approx(P * 4e-9 / H)
    assert r["host_send_bytes"] == pytest.approx(2 * (H - 1) / H * M + 2 * M32 / (H * k))  # + its SYNC share
    assert r["host_recv_bytes"] == pytest.approx(2 * (H - 1) / H * M)
    assert r["coord_in_bytes"] == pytest.approx(2 * M32 / k) and r["coord_out_bytes"] == 0
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["local_reduce_s"] + r["comm_s"] + r["update_s"])
    # overlap hides the local sum first, then at most the reduce-scatter; the all-gather only the next forward
    # (overlap_forward, dist.gather_overlap: test_the_next_forward_hides_the_all_gather_on_separate_hosts)
    some = run("mesh", H, bps=8e9, wire=2, model=dataclasses.replace(whole, overlap=0.01))
    assert some["local_hidden_s"] == pytest.approx(0.01 * some["compute_s"]) and some["comm_hidden_s"] == 0
    one = run("mesh", H, slots=1, batch=64, bps=8e9, wire=2, model=dataclasses.replace(whole, overlap=0.01))
    assert one["local_reduce_s"] == 0 and one["comm_hidden_s"] == pytest.approx(0.01 * one["compute_s"])
    full = run("mesh", H, bps=8e9, wire=2, model=dataclasses.replace(whole, overlap=1.0))
    assert full["local_hidden_s"] == pytest.approx(r["local_reduce_s"]) and full["comm_hidden_s"] == pytest.approx(rs)
    assert full["comm_exposed_s"] == pytest.approx(r["comm_s"] - rs)
    # CURVE: the host seals what it sends and opens what it receives, serially with the wire
    c = run("mesh", H, bps=8e9, wire=2, model=dataclasses.replace(whole, curve_bytes_per_cpu_s=0.5e9))
    assert c["wire_cpu_s"] == pytest.approx(f16 + (r["host_send_bytes"] + r["host_recv_bytes"]) / 2 / 0.5e9)
    assert c["comm_s"] - r["comm_s"] == pytest.approx(c["wire_cpu_s"] - f16)
    assert run("mesh", H, bps=8e9, wire=4)["wire_cpu_s"] == 0  # float32, plain: no wire CPU at all
    lap = run("mesh", H, bps=8e9, wire=2)  # the default: the next forward hides the all-gather's wire time
    assert lap["comm_hidden_s"] - r["comm_hidden_s"] == pytest.approx(min(rs, 0.3 * lap["compute_s"]))


def test_mesh_sync_every():
    M32 = 4 * P
    often, rarely = run("mesh", 4, sync_every=1), run("mesh", 4, sync_every=100)
    assert often["coord_in_bytes"] == pytest.approx(2 * M32) and rarely["coord_in_bytes"] == pytest.approx(
        2 * M32 / 100)
    assert often["host_send_bytes"] - rarely["host_send_bytes"] == pytest.approx(2 * M32 / 4 * (1 - 1 / 100))
    assert often["step_s"] > rarely["step_s"]
    with pytest.raises(ValueError, match="sync_every"):
        run("mesh", 4, sync_every=0)


def test_ddp_by_hand_and_its_own_overlap():
    M, H, S = 4 * P, 8, 8
    W = H * S  # gloo's ring runs over every rank, not over hosts
    r = run("ddp", H, bps=8e9)
    assert r["comm_s"] == pytest.approx(2 * (W - 1) / W * M / 1e9 + 2 * (W - 1) * 50e-6)
    assert r["host_send_bytes"] == r["host_recv_bytes"] == pytest.approx(2 * (W - 1) / W * M)
    assert r["local_reduce_s"] == 0  # no host sums its ranks: they are all on the ring
    assert r["coord_in_bytes"] == 0 and r["update_s"] == pytest.approx(P * 4e-9)
    same = run("ddp", H, model=dataclasses.replace(MODEL, overlap=0.5))
    own = run("ddp", H, model=dataclasses.replace(MODEL, overlap=0.5, overlap_ddp=0.0))
    assert same["comm_hidden_s"] > 0 and own["comm_hidden_s"] == 0
    assert CostModel(1.0).overlap_ddp == 0.3  # the default: as measured on the one-box bench at batch 96
    assert run("ddp", 1, slots=1)["comm_s"] == 0  # one rank: nothing to all-reduce
    assert run("ddp", 1)["host_send_bytes"] == 0 < run("ddp", 1)["comm_s"]  # one host's 8 ranks: loopback, CPU


def test_ddp_overlap_is_beside_the_per_image_backward():
    # what DDP hides is a fraction of the per-image compute (the conv layers' backward after the hidden Linear's
    # bucket is ready), none of the batch-independent part: a bigger fixed part hides nothing more
    m = dataclasses.replace(MODEL, overlap_ddp=0.5)
    r = predict("ddp", 4, 1, 64, 0.1 * GBIT, 4, P, m)
    assert r["comm_hidden_s"] == pytest.approx(0.5 * 16 * 10.0 / 1e3)
    fixed = predict("ddp", 4, 1, 64, 0.1 * GBIT, 4, P, dataclasses.replace(m, ms_per_step=500.0))
    assert fixed["comm_hidden_s"] == r["comm_hidden_s"] and fixed["step_s"] == pytest.approx(r["step_s"] + 0.48)
    # never more than the communication itself
    fast = predict("ddp", 4, 1, 64, 1000 * GBIT, 4, P, m)
    assert fast["comm_hidden_s"] == fast["comm_s"] and fast["comm_exposed_s"] == 0


def test_ddp_ring_over_ranks():
    """gloo's ring with S ranks a host: a host's link carries 2(W-1)/W of the model each way (2 x 2: 1.5 M, as
    measured: 56.8 MB a step for the 37.7 MB model, bench/netns-ddp-slots-*), and the ring goes at the pace of the
    slower of the link and the ranks' CPU."""
    M = 4 * P
    two_by_two, three_by_one = run("ddp", 2, slots=2, bps=GBIT), run("ddp", 3, slots=1, bps=GBIT)
    assert two_by_two["host_send_bytes"] == pytest.approx(1.5 * M)
    assert three_by_one["host_send_bytes"] == pytest.approx(4 / 3 * M)
    assert two_by_two["comm_s"] == pytest.approx(1.5 * M / (GBIT / 8) + 6 * 50e-6)
    one_host = run("ddp", 1, slots=4, bps=GBIT)  # every edge is loopback: CPU only
    assert one_host["host_send_bytes"] == 0
    assert one_host["comm_s"] == pytest.approx(1.5 * M / MODEL.gloo_bytes_per_cpu_s + 6 * 50e-6)
    # a fast link: the ranks' gloo CPU sets the pace; shared cores slow it by the sharing factor
    fast = run("ddp", 2, slots=2, bps=1000 * GBIT)
    assert fast["comm_s"] == pytest.approx(fast["ring_cpu_s"] + 6 * 50e-6)
    shared = run("ddp", 2, slots=2, bps=1000 * GBIT, model=dataclasses.replace(MODEL, shared_cores=2))
    assert shared["ring_cpu_s"] == pytest.approx(2 * fast["ring_cpu_s"])


def test_defaults_are_the_validated_ones():
    d = CostModel(1.0)
    assert (d.link_efficiency, d.overlap, d.overlap_ddp, d.curve_bytes_per_cpu_s, d.shared_cores,
            d.gloo_bytes_per_cpu_s) == (0.95, 0.6, 0.3, 0.62e9, None, 1.65e9)
    assert d.wire_s_per_byte == pytest.approx(1 / 0.62e9)
    assert dataclasses.replace(d, curve_bytes_per_cpu_s=None).wire_s_per_byte == 0


# ---------------------------------------------------------------------------------------------- one box

def test_shared_cores_by_hand():
    """Two hosts of one slot on a 2-core box, float32, CURVE: the bench's smallest row, by hand."""
    m = dataclasses.replace(MODEL, curve_bytes_per_cpu_s=0.62e9, overlap=0.6, shared_cores=2)
    M, M32, H, bw, k = 4 * P, 4 * P, 2, 125e6, 10
    r = run("mesh", H, slots=1, batch=16, bps=1e9, model=m)
    c = (20 + 8 * 10) / 1e3  # 2 workers on 2 cores: no slowdown
    send, recv = M / 2 * 2 + 2 * M32 / (H * k), M / 2 * 2
    rs = M / 2 / bw + 50e-6
    wire = (send + recv) / 2 / 0.62e9
    assert r["compute_s"] == pytest.approx(c) and r["wire_cpu_s"] == pytest.approx(wire)
    assert r["comm_hidden_s"] == pytest.approx(min(0.6 * c, rs))
    assert r["step_s"] == pytest.approx(c + 2 * rs + 2 * M32 / (H * k) / bw + wire + 2 * 50e-6 - r["comm_hidden_s"]
                                        + P * 4e-9 / 2)
    # four hosts on the same two cores: the workers run at half speed, the hosts' wire work too
    r4 = run("mesh", 4, slots=1, batch=16, bps=1e9, model=m)
    assert r4["compute_s"] == pytest.approx(2 * (20 + 4 * 10) / 1e3)
    alone = run("mesh", 4, slots=1, batch=16, bps=1e9, model=dataclasses.replace(m, shared_cores=None))
    assert r4["wire_cpu_s"] == pytest.approx(2 * alone["wire_cpu_s"])
    assert r4["update_s"] == pytest.approx(2 * alone["update_s"])


@pytest.mark.parametrize("plane", plan.PLANES)
@pytest.mark.parametrize("wire", [2, 4])
def test_shared_cores_monotonic_in_cores(plane, wire):
    base = dataclasses.replace(CostModel(ms_per_image=10.0, ms_per_step=20.0))
    for hosts, slots, batch, bps in ((2, 1, 16, GBIT), (4, 1, 16, 0.5 * GBIT), (4, 2, 64, 10 * GBIT),
                                     (16, 8, 4096, 25 * GBIT)):
        rows = [predict(plane, hosts, slots, batch, bps, wire, P, dataclasses.replace(base, shared_cores=n))
                for n in (1, 2, 3, 4, 8, 16, 64, 1024)]
        steps = [r["step_s"] for r in rows]
        assert all(x >= y - 1e-12 for x, y in zip(steps, steps[1:])), steps  # more cores: never slower
        off = predict(plane, hosts, slots, batch, bps, wire, P, base)
        assert off["step_s"] <= steps[0] + 1e-12 and off["cpu_s"] == 0 and not off["cpu_bound"]
        # enough cores for every thread: the same as separate hosts
        assert rows[-1]["step_s"] == pytest.approx(off["step_s"])


def test_shared_cores_cpu_bound():
    # 64 workers on one core with a fast link: the box's CPU, not the chain, sets the step
    m = CostModel(ms_per_image=10.0, ms_per_step=20.0, shared_cores=1)
    r = predict("star", 8, 8, 512, 100 * GBIT, 4, P, m)
    assert r["cpu_bound"] and r["step_s"] == pytest.approx(r["cpu_s"])
    # DDP's chain hides its ring behind backward, but on one core that CPU is still spent: the bound sets the step
    r = predict("ddp", 8, 8, 512, 100 * GBIT, 4, P, m)
    assert r["comm_hidden_s"] > 0 and r["cpu_bound"] and r["step_s"] == pytest.approx(r["cpu_s"])
    ring = 2 * 63 / 64 * 4 * P / m.gloo_bytes_per_cpu_s  # each rank's share of gloo's ring
    assert r["cpu_s"] == pytest.approx(64 * (20 + 8 * 10) / 1e3 + 64 * ring + 64 * P * 4e-9)


def test_parse_shared_cores():
    assert plan_cli.parse_shared_cores("2") == 2 and plan_cli.parse_shared_cores(None) is None
    assert all(plan_cli.parse_shared_cores(t) is None for t in ("off", "OFF", "none", "0"))
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match="--shared-cores"):
            plan_cli.parse_shared_cores(bad)


@pytest.mark.parametrize("plane", plan.PLANES)
def test_monotonic_in_bandwidth(plane):
    for hosts in (1, 2, 16, 64):
        rows = [run(plane, hosts, bps=b * GBIT) for b in (0.1, 1, 10, 25, 100)]
        steps = [r["step_s"] for r in rows]
        assert steps == sorted(steps, reverse=True)
        if hosts > 1 or plane == "star":
            comms = [r["comm_s"] for r in rows]
            # DDP's ring goes at the pace of the slower of the link and its ranks' CPU: flat once the CPU's
            faster = [x > y or (plane == "ddp" and r["ring_cpu_s"] >= r["ring_wire_s"] and x == y)
                      for x, y, r in zip(comms, comms[1:], rows[1:])]
            assert all(faster)


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
        # what grows is the per-message latency: H - 1 messages each way (DDP: W - 1, its ring is over ranks)
        per = 8 if plane == "ddp" else 1
        assert rows[-1]["comm_s"] - rows[-2]["comm_s"] == pytest.approx(
            (no_latency[1]["comm_s"] - no_latency[0]["comm_s"]) + 2 * (256 - 64) * per * 50e-6)
    # the coordinator: each host's slice of weights + momentum every sync_every (10) steps, whatever H
    assert all(r["coord_in_bytes"] == pytest.approx(2 * M / 10) for r in (run("mesh", h) for h in hosts))


@pytest.mark.parametrize("plane", plan.PLANES)
def test_float16_halves_the_bytes(plane):
    a, b = run(plane, 16, wire=4), run(plane, 16, wire=2)
    sync = 2 * 4 * P / (16 * 10) if plane == "mesh" else 0.0  # mesh's SYNC stays float32
    for k in ("model_bytes", "host_send_bytes", "host_recv_bytes"):
        assert b[k] - (sync if k == "host_send_bytes" else 0) == pytest.approx(
            (a[k] - (sync if k == "host_send_bytes" else 0)) / 2)
    if plane == "mesh":
        assert b["coord_in_bytes"] == a["coord_in_bytes"] == pytest.approx(2 * 4 * P / 10)
        assert b["reduce_scatter_s"] < a["reduce_scatter_s"] and b["wire_cpu_s"] > a["wire_cpu_s"] == 0
    else:
        for k in ("coord_in_bytes", "coord_out_bytes"):
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
    # The coordinator takes 2/sync_every of the model per step: with a thin enough uplink that sets the pace
    thin = dataclasses.replace(MODEL, coord_link_ratio=0.001)
    r = run("mesh", 8, bps=1e9, model=thin)
    assert r["coord_bound"] and r["step_s"] == pytest.approx(r["coord_link_s"]) == pytest.approx(
        2 * 4 * P / 10 / (0.001 * 1e9 / 8))
    assert not run("mesh", 8)["coord_bound"]


@settings(max_examples=400, deadline=None)
@given(plane=st.sampled_from(plan.PLANES + plan.ONE_HOST), hosts=st.integers(1, 512), slots=st.integers(1, 64),
       batch=st.integers(1, 1 << 16), gbit=st.floats(0.001, 400), wire=st.sampled_from([2, 4]),
       params=st.integers(1, 10**9), per_image=st.floats(1e-3, 1e3), per_step=st.floats(0, 1e3),
       latency=st.floats(0, 1e-2), upd=st.floats(0, 100), mem=st.floats(1e8, 1e11), overlap=st.floats(0, 1),
       eff=st.floats(0.1, 1), ratio=st.floats(0.1, 100), curve=st.none() | st.floats(1e6, 1e11),
       f16=st.floats(0, 100), cores=st.none() | st.integers(1, 4096), sync=st.integers(1, 1000),
       factored=st.none() | st.tuples(st.integers(1, 1 << 15), st.integers(1, 1 << 12)),
       factor_update=st.sampled_from(["auto", "owners", "replicated"]), gemm=st.floats(1e8, 1e13),
       fcompute=st.none() | st.tuples(st.floats(1e-3, 1e3), st.floats(0, 1e3)))
def test_efficiency_never_exceeds_one(plane, hosts, slots, batch, gbit, wire, params, per_image, per_step, latency,
                                      upd, mem, overlap, eff, ratio, curve, f16, cores, sync, factored,
                                      factor_update, gemm, fcompute):
    """Against one host alone at its best: whatever the constants, and with a factored Linear of any shape, factored
    or not by any plane (its factored step's figures may even exceed the unfactored ones)."""
    m = CostModel(ms_per_image=per_image, ms_per_step=per_step, latency_s=latency, link_efficiency=eff,
                  update_ns_per_param=upd, mem_bytes_per_s=mem, overlap=overlap, coord_link_ratio=ratio,
                  curve_bytes_per_cpu_s=curve, f16_encode_ns=f16, f16_decode_ns=f16 / 2, shared_cores=cores,
                  gemm_flops_per_s=gemm, ms_per_image_factored=fcompute and fcompute[0],
                  ms_per_step_factored=fcompute and fcompute[1])
    if plane in plan.ONE_HOST:
        hosts = 1
    if factored is not None:
        params = max(params, factored[0] * factored[1])
    r = predict(plane, hosts, slots, batch, gbit * GBIT, wire, params, m, sync, factored, factor_update)
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
                   {"coord_link_ratio": 0.0}, {"curve_bytes_per_cpu_s": 0.0}, {"overlap_ddp": -0.1},
                   {"update_ns_per_param": math.nan}, {"shared_cores": 0}, {"shared_cores": 1.5},
                   {"f16_decode_ns": -1.0}):
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
    assert plan_calibration.fit_affine({2: 40.0, 32: 340.0}) == pytest.approx((20.0, 10.0))
    assert plan_calibration.fit_affine({2: 10.0, 32: 320.0}) == pytest.approx((0.0, 10.0))  # a negative fixed part: dropped
    assert plan_calibration.fit_affine({2: 40.0, 32: 32.0}) == pytest.approx((0.0, 1.0))  # a negative slope: per image only


TINY = {"model.widths": "[8,16]", "model.res_width": "16", "model.hidden": "32", "data.image_size": "32"}


def test_calibrate_times_the_real_model():
    entry = plan_calibration.calibrate(config_mod.load(None, TINY), 10, batches=(2, 8), warmup=1, steps=2)
    assert entry["ms_per_image"] > 0 and entry["ms_per_step"] >= 0
    assert set(entry["measured_ms"]) == {"2", "8"} and entry["batches"] == [2, 8]
    assert entry["cpu_model"] == plan_calibration.cpu_model() and entry["model"]["widths"] == [8, 16]
    # the factored step too (its hidden Linear, 1024 x 32, factored) and one core's GEMM rate on dW's shape
    assert entry["ms_per_image_factored"] > 0 and entry["ms_per_step_factored"] >= 0
    assert set(entry["measured_ms_factored"]) == {"2", "8"} and entry["gemm_flops_per_s"] > 0
    assert entry["gemm_shape"] == [plan_calibration.GEMM_ROWS, plan_calibration.GEMM_BATCH, 32]


def test_time_numpy_factored_leaves_the_weight_gradient_alone():
    from dptrain.bench import local as bench_local
    cfg = config_mod.load(None, {**TINY, "train.batch_size": "4"})
    r = bench_local.time_numpy(cfg, 10, 0, 1, progress=False, factored=True)
    assert r["factored"] and not bench_local.time_numpy(cfg, 10, 0, 1, progress=False)["factored"]


def test_calibration_entries_without_the_factored_figures_still_load(tmp_path, monkeypatch):
    """A cache entry written before the factored step and the GEMM rate were measured: it stands (no surprise
    recalibration), the unfactored figures and the default GEMM rate stand in, and the compute line says so."""
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path))
    cfg = config_mod.load(None, TINY)
    old = {**plan_calibration._key(cfg, 10, plan_calibration.cpu_model()), "ms_per_step": 1.5, "ms_per_image": 2.5,
           "batches": [2, 32], "measured_ms": {"2": 6.5, "32": 81.5}, "measured_update_ns_per_param": 1.2,
           "created": "2026-11-26T10:00:00"}
    plan_calibration.save_calibration(old)
    monkeypatch.setattr(plan_calibration, "calibrate", lambda *a, **k: pytest.fail("recalibrated"))
    args = type("A", (), {"compute_ms_per_image": None, "compute_ms_per_step": 0.0, "calibrate": False})
    fixed, per_image, source, more = plan_calibration.compute_source(args, cfg, 10)
    assert (fixed, per_image) == (1.5, 2.5) and set(more.values()) == {None}
    assert "older entry" in source and "GEMM rate not in this entry" in source
    model = CostModel(ms_per_image=per_image, ms_per_step=fixed, **{k: v for k, v in more.items() if v is not None})
    assert plan.compute_s(model, 4, factored=True) == plan.compute_s(model, 4)
    new = {**old, "ms_per_step_factored": 1.0, "ms_per_image_factored": 2.0, "gemm_flops_per_s": 9e10}
    plan_calibration.save_calibration(new)
    fixed, per_image, source, more = plan_calibration.compute_source(args, cfg, 10)
    assert more == {"ms_per_step_factored": 1.0, "ms_per_image_factored": 2.0, "gemm_flops_per_s": 9e10,
                    "ddp_ms_per_step": None, "ddp_ms_per_image": None}
    assert "factored step 1.0 ms + 2.00 ms/image" in source and "GEMM 90 GFLOP/s" in source
    assert "no PyTorch step in this older entry" in source  # DDP's ranks compute as ours, said so
    # an entry with PyTorch's figures: DDP's rows compute with them, and only DDP's
    plan_calibration.save_calibration({**new, "ddp_ms_per_step": 0.5, "ddp_ms_per_image": 1.0,
                                       "torch_version": "2.x"})
    fixed, per_image, source, more = plan_calibration.compute_source(args, cfg, 10)
    assert (more["ddp_ms_per_step"], more["ddp_ms_per_image"]) == (0.5, 1.0)
    assert "DDP ranks compute as PyTorch 2.x measured: 0.5 ms + 1.00 ms/image" in source
    model = CostModel(ms_per_image=per_image, ms_per_step=fixed, **{k: v for k, v in more.items() if v is not None})
    assert plan.compute_s(model, 4, ddp=True) == pytest.approx((0.5 + 4 * 1.0) / 1e3)
    assert plan.compute_s(model, 4) == pytest.approx((1.5 + 4 * 2.5) / 1e3)
    for plane, c in (("ddp", 0.5 + 8 * 1.0), ("mesh", 1.0 + 8 * 2.0), ("star", 1.5 + 8 * 2.5)):
        p = predict(plane, 2, 2, 32, GBIT, 4, P, model, factored=(K, F) if plane == "mesh" else None)
        assert p["compute_s"] == pytest.approx(c / 1e3), plane
    # efficiency: DDP's against one host of its own ranks (PyTorch's compute), the others' against ours
    ours = dataclasses.replace(model, ddp_ms_per_step=None, ddp_ms_per_image=None)
    for plane in ("ddp", "mesh"):
        a, b = (predict(plane, 2, 2, 32, GBIT, 4, P, m)["baseline_step_s"] for m in (model, ours))
        assert (a < b) if plane == "ddp" else (a == b), plane
    # and the command line runs on the old entry, saying so
    plan_calibration.save_calibration(old)
    r = dptrain("--hosts", 2, "--slots", 2, "--bandwidth", "1g", "--plane", "mesh", "--classes", 10,
                *(f"--{k}={v}" for k, v in TINY.items()), cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "older entry" in r.stdout and "calibrating" not in r.stderr


def test_calibration_cache_is_keyed_by_cpu_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path))
    calls = []

    def fake(cfg, classes, **kw):
        calls.append(cfg.model.widths)
        return {**plan_calibration._key(cfg, classes, plan_calibration.cpu_model()), "ms_per_step": 1.0, "ms_per_image": 2.0 * len(calls),
                "batches": [2, 32], "created": "now"}
    monkeypatch.setattr(plan_calibration, "calibrate", fake)
    args = type("A", (), {"compute_ms_per_image": None, "compute_ms_per_step": 0.0, "calibrate": False})
    small = config_mod.load(None, TINY)
    assert plan_calibration.compute_source(args, small, 10)[:2] == (1.0, 2.0)  # nothing cached: calibrates and saves
    assert plan_calibration.compute_source(args, small, 10)[:2] == (1.0, 2.0) and len(calls) == 1  # cached
    assert plan_calibration.compute_source(args, config_mod.load(None, {}), 62)[1] == 4.0 and len(calls) == 2  # other model
    assert plan_calibration.compute_source(args, small, 11)[1] == 6.0  # other classes
    args.calibrate = True
    assert plan_calibration.compute_source(args, small, 10)[1] == 8.0  # --calibrate: again, and it replaces the entry
    args.calibrate = False
    assert plan_calibration.compute_source(args, small, 10)[1] == 8.0 and len(calls) == 4
    saved = json.loads((tmp_path / plan.CALIBRATION_FILE).read_text())["entries"]
    assert len(saved) == 3 and all(e["cpu_model"] == plan_calibration.cpu_model() for e in saved)
    (tmp_path / plan.CALIBRATION_FILE).write_text("{not json")
    assert plan_calibration.compute_source(args, small, 10)[1] == 10.0  # unreadable cache: calibrate again
    args.compute_ms_per_image, args.compute_ms_per_step = 7.0, 3.0
    assert plan_calibration.compute_source(args, small, 10)[:3] == (3.0, 7.0, "given")
    assert set(plan_calibration.compute_source(args, small, 10)[3].values()) == {None}  # nothing factored given


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
    v = plan_validate.validate(rows, P, MODEL, None)
    assert [s["row"] for s in v["skipped"]] == [2, 3, 4]
    assert "not shaped" in v["skipped"][0]["reason"] and "ring" in v["skipped"][1]["reason"]
    assert "slots" in v["skipped"][2]["reason"] and "batch_size" in v["skipped"][2]["reason"]
    first, second = v["rows"]
    assert first["step_err"] == pytest.approx(0) and first["comm_err"] == pytest.approx(0)
    assert first["pred_step_given_compute_s"] == pytest.approx(exact["step_s"])
    assert second["step_err"] == pytest.approx(-0.5) and second["comm_err"] is None
    assert v["mean_abs_step_err"] == pytest.approx(0.25)
    assert len(plan_validate.validate(rows, P, MODEL, GBIT)["rows"]) == 3  # --bandwidth fills a missing rate
    with pytest.raises(ValueError, match="list"):
        plan_validate.validate({"rows": []}, P, MODEL, None)


def test_validate_reads_a_rows_factor_update_and_cipher():
    """A row's own dist.factor_update (recorded, or in its overrides) and bulk_cipher; rows without them were measured
    before either existed: the factored Linear's owners updated it, every link was CURVE."""
    base = bench_hosts_row(hosts=3, batch_size=16, overrides="--dist.plane=mesh", factored=[K, F], ddp_step_s=None)
    rows = [base, {**base, "factor_update": "replicated"},
            {**base, "overrides": "--dist.plane=mesh --dist.factor_update=replicated"},
            {**base, "bulk_cipher": "aes-gcm"}]
    model = dataclasses.replace(EPYC, shared_cores=None)
    old, rec, over, aes = plan_validate.validate(rows, P, model, None)["rows"]
    assert old["factored"] and not old["replicated"] and rec["replicated"] and over["replicated"]
    want = predict("mesh", 3, 1, 16, 1e9, 4, P, model, factored=(K, F), factor_update="replicated")
    assert rec["pred_host_out_mb"] == pytest.approx(want["host_send_bytes"] / 1e6)
    assert aes["pred_step_s"] < old["pred_step_s"]  # AES-GCM is cheaper than CURVE per byte


def test_parse_tc_rate():
    assert plan_validate.parse_tc_rate("1gbit") == 1e9 and plan_validate.parse_tc_rate("125mbps") == 1e9  # tc: mbps = MB/s
    assert plan_validate.parse_tc_rate(1e9) == 1e9
    assert all(plan_validate.parse_tc_rate(r) is None for r in ("off", "none", None, "", 0, "0"))
    with pytest.raises(ValueError):
        plan_validate.parse_tc_rate("fast")


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
    v = plan_validate.validate(rows, P, MODEL, None, params_for)
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
    assert len(plan_validate.validate(rows, P, MODEL, 1e9)["rows"]) == 5  # an unshaped link: --bandwidth assumed
    text = plan_cli.format_validation(v)
    assert "ssh refused" in text and text.count("\nstar ") == 1 and "mean |step error|" in text


def test_read_rows_list_or_lines(tmp_path):
    rows = [bench_hosts_row(), bench_hosts_row(hosts=3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.json").write_text("{oops")
    assert plan_cli.read_rows(tmp_path / "a.json") == plan_cli.read_rows(tmp_path / "b.jsonl") == rows
    with pytest.raises(ValueError, match="JSON"):
        plan_cli.read_rows(tmp_path / "c.json")


# the calibration on this AMD EPYC that the README's validation uses (compute per image is never fitted to rows)
EPYC = CostModel(ms_per_image=9.65, ms_per_step=19.3, shared_cores=2)


def bench_files(folder=BENCH):
    files = sorted(folder.glob("*.json"))
    assert [f.name for f in files] == ["1gbit-float16.json", "1gbit-float32.json", "500mbit-float16.json",
                                       "500mbit-float32.json"]
    return [(f.stem, plan_cli.read_rows(f)) for f in files]


@pytest.mark.parametrize("folder", [BENCH, BENCH / "run1"], ids=["latest", "run1"])
def test_validate_the_kept_netns_measurements(folder):
    """bench/netns-2026-11-26: rows as `dptrain bench --hosts 2,3,4` wrote them (mesh, a DDP run beside each)."""
    v = plan_validate.validate(bench_files(folder), P, EPYC, None)
    assert not v["skipped"] and len(v["rows"]) == 24
    mesh = [r for r in v["rows"] if r["source"] == "dptrain"]
    ddp = [r for r in v["rows"] if r["source"] == "ddp"]
    assert {r["plane"] for r in mesh} == {"mesh"} and {r["plane"] for r in ddp} == {"ddp"}
    assert sorted({(r["file"], r["hosts"]) for r in mesh}) == sorted(
        (f, h) for f in ("1gbit-float16", "1gbit-float32", "500mbit-float16", "500mbit-float32") for h in (2, 3, 4))
    assert {r["bandwidth_bps"] for r in v["rows"]} == {1e9, 5e8}
    assert {(r["file"].split("-")[1], r["wire_dtype"]) for r in mesh} == {("float16", "float16"),
                                                                          ("float32", "float32")}
    assert all(r["slots"] == 1 and r["batch_size"] == 16 for r in v["rows"])
    # the bytes are the plane's as built: a host sends 2(H-1)/H of the model + its SYNC share, the coordinator
    # takes 2/sync_every of the model (float32 weights + momentum) whatever the wire dtype
    for r in mesh:
        assert r["host_out_mb"] == pytest.approx(r["pred_host_out_mb"], rel=0.01)
        assert r["host_in_mb"] == pytest.approx(r["pred_host_in_mb"], rel=0.01)
        assert r["coord_in_mb"] == pytest.approx(r["pred_coord_in_mb"], rel=0.03)
        assert r["comm_err"] is None  # the bench's mesh split is not the model's exposed time
    for r in ddp:
        assert r["host_out_mb"] == pytest.approx(r["pred_host_out_mb"], rel=0.01) and r["comm_err"] is not None
    # the README's claim: the dptrain rows within 15 %, DDP within 10 %, with these global constants
    assert v["by_source"]["dptrain"]["max_abs_step_err"] < 0.15
    assert v["by_source"]["ddp"]["max_abs_step_err"] < 0.10
    text = plan_cli.format_validation(v)
    assert text.count("\n1gbit-float32") == 6 and "dptrain: mean" in text and "ddp: mean" in text
    # separate hosts (no sharing) cannot explain the one box: the shared cores are part of the result
    alone = plan_validate.validate(bench_files(folder), P, dataclasses.replace(EPYC, shared_cores=None), None)
    assert alone["by_source"]["dptrain"]["mean_abs_step_err"] > v["by_source"]["dptrain"]["mean_abs_step_err"]


def test_validate_single_list_has_no_file_labels():
    rows = bench_files()[0][1]
    v = plan_validate.validate(rows, P, EPYC, None)
    assert len(v["rows"]) == 6 and {r["file"] for r in v["rows"]} == {""}
    assert not plan_cli.format_validation(v).startswith("file")


def test_file_labels():
    assert plan_cli.file_labels(["a/x.json"]) == [""]
    assert plan_cli.file_labels(["a/x.json", "a/y.json"]) == ["x", "y"]
    assert plan_cli.file_labels(["a/x.json", "b/x.json", "b/y.json"]) == ["a/x", "b/x", "y"]


def test_plot_validation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    v = plan_validate.validate(bench_files(), P, EPYC, None)
    out = plan_validate.plot_validation(v, tmp_path / "scaling.png", "title")
    assert out == tmp_path / "scaling.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rows"):
        plan_validate.plot_validation({"rows": []}, tmp_path / "none.png")


# ---------------------------------------------------------------------------------------------- the command line

def dptrain(*args, cache):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", DPTRAIN_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "dptrain", "plan", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_factored_mesh_sends_fewer_bytes_while_the_factors_are_smaller():
    """dist.factored: at 16 images over 3 hosts the hidden Linear's 8.4 M weights leave the reduce-scatter for
    6 x (16384 x 2/3 + 2 x 512) floats of factors; at 8192 images over 8 hosts the factors would be larger: off."""
    m = CostModel(ms_per_image=20, ms_per_step=0)
    plain, fact = (predict("mesh", 3, 1, 16, 1e9, 4, P, m, factored=f) for f in (None, (16384, 512)))
    assert fact["factored"] and not plain["factored"]
    K, F = 16384, 512
    assert fact["host_send_bytes"] == pytest.approx(plain["host_send_bytes"] - 2 / 3 * K * F * 4
                                                    + 6 * (K * 2 / 3 + 2 * F) * 4)
    assert fact["step_s"] < plain["step_s"]
    big = predict("mesh", 8, 1, 8192, 1e9, 4, P, m, factored=(K, F))
    assert not big["factored"] and big["host_send_bytes"] == predict("mesh", 8, 1, 8192, 1e9, 4, P, m)["host_send_bytes"]


K, F = 16384, 512  # the default model's factored (hidden) Linear
KF = K * F
FACTORED = CostModel(ms_per_image=10.0, ms_per_step=20.0, link_efficiency=1.0, overlap=0.0, overlap_ddp=None,
                     overlap_forward=0.0,
                     curve_bytes_per_cpu_s=None, ms_per_step_factored=14.0, ms_per_image_factored=9.5,
                     gemm_flops_per_s=100e9)


def test_mesh_factored_workers_leave_w_out_of_the_local_sum_and_their_step():
    """Inside a host (mesh): where factors_pay, the workers compute the factored step and write no dW, and the agent
    sums only the other P − K·F parameters of its S slots (mesh.MeshReplica._outside_w), plus gathering the
    factors (concatenated, then each owner's columns of x): not S·4P, 60 ms at S = 8."""
    H, S, B = 16, 8, 4096
    plain = predict("mesh", H, S, B, 10 * GBIT, 4, P, FACTORED)
    r = predict("mesh", H, S, B, 10 * GBIT, 4, P, FACTORED, factored=(K, F))
    assert r["factored"] and not plain["factored"] and not r["replicated"]
    bh = B // H
    assert plain["local_reduce_s"] == pytest.approx(S * 4 * P / 5e9)  # 60 ms
    assert r["local_reduce_s"] == pytest.approx(S * 4 * (P - KF) / 5e9 + 4 * bh * (2 * K + F) / 5e9)
    assert r["local_reduce_s"] < plain["local_reduce_s"] / 4
    b = B // (H * S)
    assert plain["compute_s"] == pytest.approx((20 + b * 10) / 1e3)
    assert r["compute_s"] == pytest.approx((14 + b * 9.5) / 1e3)
    # not measured (None): the unfactored figures stand in
    unmeasured = dataclasses.replace(FACTORED, ms_per_step_factored=None, ms_per_image_factored=None)
    assert predict("mesh", H, S, B, 10 * GBIT, 4, P, unmeasured, factored=(K, F))["compute_s"] == plain["compute_s"]
    # the serial parts add up, the owner's GEMM among them
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["local_reduce_s"] + r["comm_s"] + r["factor_gemm_s"]
                                        + r["update_s"])


def test_mesh_owners_gemm_scales_with_the_batch_and_the_host():
    """An owner's rows of dW = X^T dY over the global batch: (K/H)·B·F·2 flops on its host's S cores, serial after
    the reduce-scatter; on one box (--shared-cores) it shares the cores like every worker. (The factors' copies
    before it, one thread, are left out here: infinitely fast memory.)"""
    def gemm(H=16, S=8, B=4096, model=FACTORED):
        model = dataclasses.replace(model, mem_bytes_per_s=1e300)
        r = predict("mesh", H, S, B, 10 * GBIT, 4, P, model, factored=(K, F), factor_update="owners")
        assert r["factored"]
        return r["factor_gemm_s"]
    assert gemm() == pytest.approx(2 * (K / 16) * 4096 * F / (8 * 100e9))
    # with them: every host's factors concatenated, its columns of x and all of dy
    r = predict("mesh", 16, 8, 4096, 10 * GBIT, 4, P, FACTORED, factored=(K, F))
    assert r["factor_gemm_s"] == pytest.approx(gemm() + 4 * 4096 * (K / 16 + F) / 5e9)
    assert gemm(B=2048) == pytest.approx(gemm() / 2)  # linear in B
    assert gemm(S=4) == pytest.approx(2 * gemm())  # 1/S
    assert gemm(H=32) == pytest.approx(gemm() / 2)  # each owner 1/H of the rows
    shared = dataclasses.replace(FACTORED, shared_cores=32)  # 16 × 8 threads on 32 cores: 4× slower each
    assert gemm(model=shared) == pytest.approx(4 * gemm())
    assert predict("mesh", 16, 8, 4096, 10 * GBIT, 4, P, FACTORED)["factor_gemm_s"] == 0  # not factored: none


def test_mesh_replicated_update_bytes_and_times():
    """dist.factor_update: every host sends its samples' whole x and dy to every other host, computes the whole dW
    and updates all of W itself; W leaves the all-gather (only (H−1)/H·(P − K·F) wire bytes), the reduce-scatter
    is the owners' (P − K·F plus factors)."""
    H, S, B, wire = 3, 2, 16, 2
    bh = -(-B // H)
    own = predict("mesh", H, S, B, GBIT, wire, P, FACTORED, factored=(K, F), factor_update="owners")
    rep = predict("mesh", H, S, B, GBIT, wire, P, FACTORED, factored=(K, F), factor_update="replicated")
    assert rep["replicated"] and rep["factored"] and not own["replicated"] and own["factored"]
    bw, a = GBIT / 8, 50e-6
    fb = (H - 1) * bh * (K + F) * 4
    sync = 2 * 4 * P / (H * 10)
    rest = (H - 1) / H * (P - KF) * wire
    assert rep["host_send_bytes"] == pytest.approx(2 * rest + fb + sync)
    assert rep["host_recv_bytes"] == pytest.approx(2 * rest + fb)
    assert rep["all_gather_s"] == pytest.approx(rest / bw + (H - 1) * a)  # no W in the all-gather
    assert own["all_gather_s"] == pytest.approx((H - 1) / H * P * wire / bw + (H - 1) * a)
    assert rep["reduce_scatter_s"] == pytest.approx(rest / bw + fb / bw + (H - 1) * a)
    # all of dW, on its S cores, from every host's factors concatenated and each owner's columns of x cut out
    assert rep["factor_gemm_s"] == pytest.approx(2 * K * B * F / (S * 100e9) + 4 * B * (2 * K + F) / 5e9)
    assert own["factor_gemm_s"] == pytest.approx(2 * K / H * B * F / (S * 100e9) + 4 * B * (K / H + F) / 5e9)
    # all of W updated on every host, in float32 (it never travels, so the float16 wire does not round it)
    assert rep["update_s"] == pytest.approx((P - KF) * 4e-9 / H + KF * 4e-9)
    assert rep["local_reduce_s"] == pytest.approx(S * 4 * (P - KF) / 5e9 + 4 * bh * (K + F) / 5e9)
    f16 = ((P - KF) * (3.2 + 2.6) + (P - KF) * (3.2 / H + 2.6)) * 1e-9  # W in neither collective
    assert rep["wire_cpu_s"] == pytest.approx(f16)
    # the wire's cipher on those bytes: AES-GCM on the host-to-host ones, CURVE on the SYNC share
    aes = dataclasses.replace(FACTORED, curve_bytes_per_cpu_s=0.62e9, aes_gcm_bytes_per_cpu_s=1.15e9)
    sealed = predict("mesh", H, S, B, GBIT, wire, P, aes, factored=(K, F), factor_update="replicated")
    moved = (rep["host_send_bytes"] - sync + rep["host_recv_bytes"]) / 1.15e9 / 2
    # separate hosts: the AES part beside the wire (bench/cipher_pipeline.py), on the pool's threads (auto: min(4, S)
    # = 2 here) in the all-gather, on the comm core in the reduce-scatter (under backward), plus about three pieces
    # sealed and opened (PIPELINE_FILL_PIECES); what stays in series: float16 and the SYNC's CURVE share
    from dptrain.distributed.mesh_layout import GATHER_PIECE, PIECE
    assert sealed["wire_cpu_s"] == pytest.approx(f16 + sync / 0.62e9 / 2)
    out_rs, out_ag = rest + fb, rest
    assert sealed["all_gather_s"] == pytest.approx(  # 1 Gbit/s: the wire is the slower
        rep["all_gather_s"] + 3 * min(GATHER_PIECE * wire, out_ag / (H - 1)) / 1.15e9)
    assert sealed["reduce_scatter_s"] == pytest.approx(
        rep["reduce_scatter_s"] + 3 * min(PIECE * wire, out_rs / (H - 1)) / 1.15e9)
    slow = dataclasses.replace(aes, aes_gcm_bytes_per_cpu_s=0.02e9)  # a cipher slower than the wire sets the pace
    for threads, share in ((0, 2), (1, 1)):
        t = predict("mesh", H, S, B, GBIT, wire, P, dataclasses.replace(slow, cipher_threads=threads),
                    factored=(K, F), factor_update="replicated")
        assert t["all_gather_s"] == pytest.approx(
            out_ag / 0.02e9 / share + 3 * min(GATHER_PIECE * wire, out_ag / (H - 1)) / 0.02e9)
        assert t["reduce_scatter_s"] == pytest.approx(out_rs / 0.02e9 + 3 * min(PIECE * wire, out_rs / (H - 1)) / 0.02e9)
    shared = predict("mesh", H, S, B, GBIT, wire, P, dataclasses.replace(aes, shared_cores=2), factored=(K, F),
                     factor_update="replicated")  # one box: every end on the same cores, the cipher in series
    assert shared["wire_cpu_s"] == pytest.approx(sharing_factor(H, 2) * (f16 + moved + sync / 0.62e9 / 2))
    assert shared["all_gather_s"] == pytest.approx(rep["all_gather_s"])


def sharing_factor(threads: int, cores: int) -> float:
    return max(1.0, threads / cores)


def test_mesh_factor_update_follows_replicate_pays():
    """auto: replicated while mesh_layout.replicate_pays says so (small global batches); owners: never; replicated: always
    where the layer is factored at all (factors_pay), never where it is not."""
    def repl(B, mode, H=3, wire=4):
        return predict("mesh", H, 1, B, GBIT, wire, P, FACTORED, factored=(K, F), factor_update=mode)["replicated"]
    assert repl(16, "auto") and not repl(16, "owners") and repl(16, "replicated")
    assert not repl(4096, "auto", H=16)  # above REPLICATE_MAX_BATCH
    assert not repl(8192, "replicated", H=8)  # the layer is not factored there (factors_pay): nothing to replicate
    assert not predict("mesh", 3, 1, 16, GBIT, 4, P, FACTORED, factor_update="replicated")["replicated"]
    with pytest.raises(ValueError, match="factor_update"):
        predict("mesh", 3, 1, 16, GBIT, 4, P, FACTORED, factored=(K, F), factor_update="everyone")


def test_one_host_factored_reduction():
    """One host (launch --workers S): where reduce.local_factors_pay, the workers leave factors, the reduction sums
    P − K·F per slot and computes dW = X^T dY over the batch: each worker its 1/S of the rows (one core each), or
    the coordinator all of it (one BLAS thread)."""
    S, B = 16, 64
    w = predict("workers", 1, S, B, None, 4, P, FACTORED, factored=(K, F))
    c = predict("coordinator", 1, S, B, None, 4, P, FACTORED, factored=(K, F))
    assert w["factored"] and c["factored"]
    assert w["local_reduce_s"] == pytest.approx(4 * (P - KF) / 5e9)
    assert c["local_reduce_s"] == pytest.approx(S * 4 * (P - KF) / 5e9)
    assert w["factor_gemm_s"] == pytest.approx(2 * K * B * F / (S * 100e9) + 4 * B * (K / S + F) / 5e9)
    assert c["factor_gemm_s"] == pytest.approx(2 * K * B * F / 100e9 + 4 * B * (K + F) / 5e9)
    assert c["serial_s"] == pytest.approx(c["local_reduce_s"] + c["factor_gemm_s"] + P * 4e-9 + 0.8e-3)
    assert w["compute_s"] == pytest.approx((14 + 4 * 9.5) / 1e3)
    assert w["step_s"] == pytest.approx(w["compute_s"] + w["local_reduce_s"] + w["comm_s"] + w["factor_gemm_s"]
                                        + w["update_s"])
    # 4096 images on 8 ranks: the ranks' weight gradients are fewer bytes than the factors, so none
    big = predict("workers", 1, 8, 4096, None, 4, P, FACTORED, factored=(K, F))
    assert not big["factored"] and big["factor_gemm_s"] == 0 and big["local_reduce_s"] == pytest.approx(4 * P / 5e9)
    # the denominator knows the factored host: no plane beats it
    base = plan.baseline(S, B, P, FACTORED, (K, F))
    assert base["step_s"] <= w["step_s"] and base["step_s"] < plan.baseline(S, B, P, FACTORED)["step_s"]


def test_cli_json(tmp_path):
    r = dptrain("--hosts", "4,1,16", "--slots", 8, "--bandwidth", "10gbit,25gbit", "--batch-size", 4096,
                "--compute-ms-per-image", 10, "--compute-ms-per-step", 20, "--wire-dtype", "float16", "--json",
                cache=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout is one JSON object
    assert out["num_params"] == P and out["wire_dtype"] == "float16" and out["batch"] == 4096
    assert [(row["bandwidth_bps"], row["plane"], row["hosts"]) for row in out["rows"]] == [
        (b, p, h) for b in (10e9, 25e9) for p in plan.PLANES + plan.ONE_HOST for h in (1, 4, 16)
        if p not in plan.ONE_HOST or h == 1]  # one host: the workers' update and the coordinator's too
    # dist.bulk_cipher's default prices the mesh's host-to-host bytes (aes-gcm since 2026-12-07)
    aes = plan.AES_GCM_BYTES_PER_CPU_S if config_mod.DistConfig().bulk_cipher == "aes-gcm" else None
    assert out["cost_model"]["aes_gcm_bytes_per_cpu_s"] == aes
    for row in out["rows"]:
        want = predict(row["plane"], row["hosts"], 8, 4096, row["bandwidth_bps"], 2, P,
                       CostModel(ms_per_image=10, ms_per_step=20, aes_gcm_bytes_per_cpu_s=aes),
                       factored=(16384, 512), factor_update="auto")  # dist.factored, dist.factor_update's defaults
        assert row == pytest.approx(want)
    assert not list(tmp_path.iterdir())  # given compute: nothing calibrated, nothing cached


def test_cli_factor_update_and_bulk_cipher_overrides(tmp_path):
    """`dptrain plan --dist.factor_update=...` like any config override; the table marks the replicated rows; the
    cipher is dist.bulk_cipher's (its default when not given)."""
    args = ("--hosts", 3, "--slots", 1, "--bandwidth", "1gbit", "--batch-size", 16, "--plane", "mesh",
            "--compute-ms-per-image", 9.65, "--compute-ms-per-step", 19.3)
    rows = {}
    for mode in ("owners", "replicated", "auto"):
        r = dptrain(*args, f"--dist.factor_update={mode}", "--json", cache=tmp_path)
        assert r.returncode == 0, r.stderr
        (rows[mode],) = json.loads(r.stdout)["rows"]
    assert rows["replicated"]["replicated"] and not rows["owners"]["replicated"]
    assert rows["auto"] == rows["replicated"]  # 16 images over 3 hosts: replicate_pays
    def mesh_lines(mode):
        r = dptrain(*args, f"--dist.factor_update={mode}", cache=tmp_path)
        assert f"update {mode} (dist.factor_update)" in r.stdout
        return [ln for ln in r.stdout.splitlines() if ln.startswith("mesh")]
    assert mesh_lines("replicated")[0].endswith("W-replicated")
    assert "W-replicated" not in mesh_lines("owners")[0]
    default = json.loads(dptrain(*args, "--json", cache=tmp_path).stdout)["cost_model"]
    aes = json.loads(dptrain(*args, "--dist.bulk_cipher=aes-gcm", "--json", cache=tmp_path).stdout)["cost_model"]
    assert aes["aes_gcm_bytes_per_cpu_s"] == plan.AES_GCM_BYTES_PER_CPU_S
    assert (default["aes_gcm_bytes_per_cpu_s"] is not None) == (config_mod.DistConfig().bulk_cipher == "aes-gcm")


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


def test_cli_validate_files_and_plot(tmp_path):
    files = sorted(BENCH.glob("*.json"))
    png = tmp_path / "scaling.png"
    r = dptrain("--validate", *files, "--plot", png, "--compute-ms-per-image", 9.65, "--compute-ms-per-step", 19.3,
                "--shared-cores", 2, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "share 2 core(s)" in r.stdout and "500mbit-float16" in r.stdout and "dptrain: mean" in r.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:4] == b"\x89PNG"
    j = dptrain("--validate", *files, "--compute-ms-per-image", 9.65, "--compute-ms-per-step", 19.3, "--shared-cores",
                "2", "--json", cache=tmp_path)
    out = json.loads(j.stdout)
    assert out["cost_model"]["shared_cores"] == 2 and len(out["rows"]) == 24
    assert out["by_source"]["dptrain"]["max_abs_step_err"] < 0.15
    # --validate alone assumes this machine's cores (bench --hosts runs every host here); off: separate hosts
    auto = dptrain("--validate", files[0], "--compute-ms-per-image", 9.65, "--json", cache=tmp_path)
    assert json.loads(auto.stdout)["cost_model"]["shared_cores"] == os.cpu_count()
    off = dptrain("--validate", files[0], "--compute-ms-per-image", 9.65, "--shared-cores", "off", "--json",
                  cache=tmp_path)
    assert json.loads(off.stdout)["cost_model"]["shared_cores"] is None


@pytest.mark.parametrize("argv, words", [
    (["--hosts", "2", "--slots", "2", "--bandwidth", "10gbps"], "ambiguous"),
    (["--hosts", "2", "--slots", "2"], "required"),
    (["--hosts", "1", "--slots", "2", "--plane", "star"], "--bandwidth is required"),
    (["--hosts", "1,2", "--slots", "2"], "--bandwidth is required"),
    (["--hosts", "0", "--slots", "2", "--bandwidth", "1g"], "host counts >= 1"),
    (["--hosts", "a", "--slots", "2", "--bandwidth", "1g"], "comma list"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--plane", "ring"], "--plane"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--overlap", "2"], "overlap"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--model.nope=1"], "unknown config key"),
    (["--validate", "/nonexistent/rows.json"], "rows.json"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--plot", "x.png"], "--validate"),
    (["--hosts", "2", "--slots", "2", "--bandwidth", "1g", "--shared-cores", "many"], "--shared-cores"),
])
def test_cli_errors_name_the_problem(tmp_path, argv, words):
    r = dptrain(*argv, "--compute-ms-per-image", 10, cache=tmp_path)
    assert r.returncode != 0 and words in r.stderr
    assert "Traceback" not in r.stderr


def test_one_host_the_workers_update_takes_the_serial_part_off_the_step():
    """`dptrain plan --hosts 1 --slots 16`: the coordinator summing 16 slots and updating alone against the workers
    each reducing and updating their slice: the serial part is the control messages, whatever S."""
    model = CostModel(ms_per_image=10, ms_per_step=20)
    coord = predict("coordinator", 1, 16, 64, 1e10, 4, 9_434_462, model)
    workers = predict("workers", 1, 16, 64, 1e10, 4, 9_434_462, model)
    assert coord["serial_s"] > 0.1 and workers["serial_s"] == model.local_control_s
    assert workers["step_s"] < coord["step_s"] / 2 and workers["efficiency"] <= 1 < 2 * workers["efficiency"]
    assert predict("workers", 1, 2, 64, 1e10, 4, 9_434_462, model)["serial_s"] == workers["serial_s"]
    with pytest.raises(ValueError, match="one host"):
        predict("workers", 2, 16, 64, 1e10, 4, 9_434_462, model)


def test_cli_one_host_needs_no_bandwidth(tmp_path):
    """`dptrain plan --hosts 1 --slots 16`: launch --workers 16 has no link to size, so no --bandwidth is asked for
    and the one host's two planes (the workers' update, the coordinator's) are what it shows."""
    r = dptrain("--hosts", 1, "--slots", 16, "--compute-ms-per-image", 10, "--compute-ms-per-step", 20, "--json",
                cache=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [(row["plane"], row["bandwidth_bps"]) for row in rows] == [("workers", None), ("coordinator", None)]
    model = CostModel(ms_per_image=10, ms_per_step=20)
    for row in rows:  # the same figures as with any link: one host's planes never use it
        assert row == pytest.approx({**predict(row["plane"], 1, 16, 64, 1e10, 4, P, model, factored=(16384, 512)),
                                     "bandwidth_bps": None})  # 64 images on 16 ranks: factored (local_factors_pay)
    table = dptrain("--hosts", 1, "--slots", 16, "--compute-ms-per-image", 10, cache=tmp_path)
    assert table.returncode == 0 and [ln.split()[:2] for ln in table.stdout.splitlines()
                                      if ln.startswith(("workers", "coordinator"))] == [["workers", "-"],
                                                                                        ["coordinator", "-"]]


SLOTS = Path(__file__).resolve().parent.parent / "bench" / "netns-ddp-slots-2026-12-07"


def test_validate_two_slots_per_host_and_batch_96():
    """bench/netns-ddp-slots-2026-12-07: 2 hosts x 2 slots and 3 x 1, global batch 16 and 96, 1 Gbit/s, mesh and DDP
    side by side. The model's claim (issue 30): every row within 15 % with the default constants. These rows are
    fixed data, so this checks the model, not the box; overlap_ddp was set from the two batch-96 DDP rows (their
    measured hidden fraction, 0.28 and 0.33), every other constant from other measurements (the bench's CPU model,
    the ring's bytes from gloo's algorithm, its CPU from --ring-cpu)."""
    files = sorted(SLOTS.glob("1gbit-*.json"))
    assert len(files) == 4
    v = plan_validate.validate([(f.stem, plan_cli.read_rows(f)) for f in files], P, EPYC, None)
    assert not v["skipped"] and len(v["rows"]) == 8
    assert sorted((r["hosts"], r["slots"], r["batch_size"], r["plane"]) for r in v["rows"]) == sorted(
        (h, s, b, p) for h, s in ((2, 2), (3, 1)) for b in (16, 96) for p in ("mesh", "ddp"))
    for r in v["rows"]:
        assert abs(r["step_err"]) < 0.15, r
        assert r["host_out_mb"] == pytest.approx(r["pred_host_out_mb"], rel=0.01) or r["plane"] == "mesh"
    # the mechanism behind the 2 x 2 row: gloo's ring over 4 ranks sends 1.5 M over a host's link, not M
    ddp22 = [r for r in v["rows"] if r["plane"] == "ddp" and r["slots"] == 2]
    assert all(r["host_out_mb"] == pytest.approx(1.5 * 4 * P / 1e6, rel=0.01) for r in ddp22)
    # the wire's CPU measured per row (ZeroMQ I/O threads): every agent seals what it sends and opens what it gets
    mesh = [r for r in v["rows"] if r["plane"] == "mesh"]
    assert all(r["wire_cpu_s"] > 0 and 0.5e9 < r["wire_bytes_per_io_cpu_s"] < 5e9 for r in mesh)
    assert "crypto: 4 dptrain row(s) measured" in plan_cli.format_validation(v)
    # the model before (a ring over hosts, M a link, and a local sum) missed the 2 x 2 DDP rows by more than 15 %
    old = [r for r in ddp22 if r["batch_size"] == 16][0]
    old_pred = old["pred_step_s"] - 0.5 * 4 * P / (GBIT / 8 * 0.95)
    assert old_pred / old["step_s"] - 1 < -0.15


def test_validate_two_slots_per_host_checks():
    """bench/netns-ddp-slots-2026-12-07/check-*: 2 x 2 at 500 Mbit/s (batch 16 and 96) and with the mesh on float16
    (1 Gbit/s), measured after the model's constants were set: nothing was fitted to them. Every row within 15 %."""
    files = sorted(SLOTS.glob("check-*.json"))
    assert len(files) == 3
    v = plan_validate.validate([(f.stem, plan_cli.read_rows(f)) for f in files], P, EPYC, None)
    assert not v["skipped"] and len(v["rows"]) == 6
    assert {r["bandwidth_bps"] for r in v["rows"]} == {1e9, 5e8}
    assert {(r["plane"], r["wire_dtype"]) for r in v["rows"]} == {("mesh", "float32"), ("mesh", "float16"),
                                                                  ("ddp", "float32")}
    for r in v["rows"]:
        assert abs(r["step_err"]) < 0.15, r


CIPHER = Path(__file__).resolve().parent.parent / "bench" / "cipher-2026-12-07" / "hosts3"


def test_bulk_cipher_aes_gcm_costs_the_mesh_less_wire_cpu():
    """dist.bulk_cipher = aes-gcm: the mesh's host-to-host bytes cost 1 / aes_gcm_bytes_per_cpu_s each instead of
    CURVE's, in series with the wire where every end shares the box's cores, beside it on separate hosts (the pool
    seals and opens pieces while others travel: no serial wire CPU left but the SYNC's CURVE); the SYNC share (the
    coordinator's link), the star and DDP are unchanged; without keys (no CURVE) nothing is sealed either way."""
    args = (3, 1, 16, GBIT, 4, P)
    sync = 2 * 4 * P / (3 * 10)
    for cores in (2, None):
        curve = dataclasses.replace(EPYC, shared_cores=cores)
        aes = dataclasses.replace(curve, aes_gcm_bytes_per_cpu_s=plan.AES_GCM_BYTES_PER_CPU_S)
        c, a = predict("mesh", *args, curve), predict("mesh", *args, aes)
        moved = c["host_send_bytes"] - sync + c["host_recv_bytes"]
        aes_s = 0.0 if cores is None else 1 / plan.AES_GCM_BYTES_PER_CPU_S
        share = 1.5 if cores else 1.0  # 3 hosts' wire work on 2 cores
        want = share * moved / 2 * (1 / curve.curve_bytes_per_cpu_s - aes_s)
        assert c["wire_cpu_s"] - a["wire_cpu_s"] == pytest.approx(want, rel=1e-9)
        assert a["step_s"] < c["step_s"]
    for plane in ("star", "ddp"):
        assert predict(plane, *args, aes)["step_s"] == predict(plane, *args, curve)["step_s"]
    plain = dataclasses.replace(aes, curve_bytes_per_cpu_s=None)
    assert predict("mesh", *args, plain)["wire_cpu_s"] == 0.0


def test_overrides_keep_the_values_dashes():
    assert plan_validate._overrides("--dist.bulk_cipher=aes-gcm --model.widths=[8,16]") == {
        "dist.bulk_cipher": "aes-gcm", "model.widths": "[8,16]"}


def test_validate_the_bulk_cipher_rows():
    """bench/cipher-2026-12-07/hosts3: `dptrain bench --hosts 3 --rate 1gbit --no-ddp --steps 8` alternated curve,
    aes-gcm, aes-gcm, curve (2026-12-07, the 2-core Intel Xeon): each row predicted with its own cipher (from its
    overrides) within the planner's 15 %, and the aes-gcm rows predicted faster, as measured."""
    files = sorted(CIPHER.glob("run*.json"))
    assert len(files) == 4
    model = dataclasses.replace(EPYC, shared_cores=2)
    v = plan_validate.validate([(f.stem, plan_cli.read_rows(f)) for f in files], P, model, None)
    assert not v["skipped"] and len(v["rows"]) == 4
    for r in v["rows"]:
        assert abs(r["step_err"]) < 0.15, r
    by = {r["file"]: r for r in v["rows"]}
    assert by["run2"]["pred_step_s"] == by["run3"]["pred_step_s"] < by["run1"]["pred_step_s"] == by["run4"]["pred_step_s"]
    assert max(by["run2"]["step_s"], by["run3"]["step_s"]) < min(by["run1"]["step_s"], by["run4"]["step_s"])


def test_the_next_forward_hides_the_all_gather_on_separate_hosts():
    """dist.gather_overlap: on separate hosts the last step's all-gather arrives (and, with AES-GCM, is opened on
    the communication core) while the workers' forward before the factored Linear runs (overlap_forward of their
    compute); only this host's own pieces' sealing, on the pool before it hands the step out, stays in front. With
    --shared-cores nothing of it hides (the receiving takes the workers' cores); overlap_forward = 0 is the
    agent taking the whole all-gather first."""
    from dptrain.distributed.mesh_layout import GATHER_PIECE
    aes = dataclasses.replace(FACTORED, curve_bytes_per_cpu_s=0.62e9, aes_gcm_bytes_per_cpu_s=1.15e9)
    H, S, B = 16, 8, 4096
    whole = predict("mesh", H, S, B, 10 * GBIT, 4, P, dataclasses.replace(aes, overlap_forward=0.0))
    lap = predict("mesh", H, S, B, 10 * GBIT, 4, P, dataclasses.replace(aes, overlap_forward=0.3))
    out_ag = (H - 1) / H * P * 4  # not factored here: W is in the all-gather
    seal_own = out_ag / 1.15e9 / 2 / 4  # on min(4, S) pool threads
    beside = max((H - 1) / H * P * 4 / (10 * GBIT / 8) + (H - 1) * 50e-6, out_ag / 1.15e9 / 2) \
        + 3 * min(GATHER_PIECE * 4, out_ag / (H - 1)) / 1.15e9
    exposed = seal_own + max(0.0, beside - 0.3 * lap["compute_s"])
    assert lap["all_gather_s"] == whole["all_gather_s"]  # the phase itself is as long
    assert lap["comm_hidden_s"] - whole["comm_hidden_s"] == pytest.approx(lap["all_gather_s"] - exposed)
    assert lap["step_s"] < whole["step_s"]
    for model in (dataclasses.replace(aes, shared_cores=32), dataclasses.replace(aes, curve_bytes_per_cpu_s=None)):
        a = predict("mesh", H, S, B, 10 * GBIT, 4, P, dataclasses.replace(model, overlap_forward=0.0))
        b = predict("mesh", H, S, B, 10 * GBIT, 4, P, dataclasses.replace(model, overlap_forward=0.3))
        if model.shared_cores:  # one box: nothing hides
            assert b["step_s"] == a["step_s"]
        else:  # no cipher: the wire's time beside the forward
            assert b["comm_hidden_s"] - a["comm_hidden_s"] == pytest.approx(
                min(a["all_gather_s"], 0.3 * a["compute_s"]))
