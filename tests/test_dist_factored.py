"""One host, dist.factored: the workers leave the hidden Linear's inputs and output gradients (its factors) instead of
its weight gradient, and the reduction computes dW = X^T dY over the whole batch in fixed blocks of rows. The same
gradient as summing the ranks' own dW (to float32 rounding), and the same bits whichever slices the reducers take."""
from __future__ import annotations

import numpy as np
import pytest
from distutil import arrays, launch_inproc, tiny_cfg
from gradcheck import norm_rel_error

from dptrain.distributed.reduce import ROWS, Factors, local_factors_pay, one_host_factored, reduce_range

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2

WIDE = dict(model__hidden=256, train__batch_size=31, train__epochs=2)


def _problem(rng, counts, K=3 * ROWS + 37, F=48, before=1000, after=333):
    """Every rank's flat gradient row (the factored weight's part holding garbage: nobody writes it) and factors."""
    w0 = before
    P = before + K * F + after
    xs = [rng.standard_normal((n, K)).astype(np.float32) for n in counts]
    dys = [rng.standard_normal((n, F)).astype(np.float32) for n in counts]
    parts = [rng.standard_normal(P).astype(np.float32) for _ in counts]
    for p in parts:
        p[w0:w0 + K * F] = np.nan
    return Factors(w0, K, F, xs, dys), parts, P


def test_factored_sum_is_the_ranks_weight_gradients_summed():
    rng = np.random.default_rng(0)
    f, parts, P = _problem(rng, [5, 4, 4])
    out = np.empty(P, np.float32)
    reduce_range(out, parts, 0, P, factors=f)
    outside = np.r_[0:f.w0, f.w1:P]
    assert np.array_equal(out[outside], ((parts[0] + parts[1]) + parts[2])[outside])
    dw = sum(x.astype(np.float64).T @ dy.astype(np.float64) for x, dy in zip(f.xs, f.dys))
    assert norm_rel_error(out[f.w0:f.w1].reshape(f.K, f.F), dw) < 1e-6


@pytest.mark.parametrize("n", [2, 3, 8])
def test_slices_give_the_bits_of_the_whole(n):
    """Reducers taking slices that cut the factored weight mid-row and mid-block: bitwise one pass over it all."""
    rng = np.random.default_rng(n)
    f, parts, P = _problem(rng, [3] * n, before=777)
    whole, sliced = np.empty(P, np.float32), np.full(P, np.nan, np.float32)
    reduce_range(whole, parts, 0, P, factors=f)
    cuts = sorted({0, P} | {int(c) for c in rng.integers(1, P, n - 1)})
    for lo, hi in zip(cuts, cuts[1:]):
        reduce_range(sliced, parts, lo, hi, factors=f)
    assert np.array_equal(sliced, whole)


def test_factors_pay_only_while_the_batch_is_small():
    assert local_factors_pay(64, 8, 16384, 512) and local_factors_pay(64, 1, 16384, 512)
    assert not local_factors_pay(1024, 1, 16384, 512)
    assert not local_factors_pay(8192, 8, 16384, 512)


def test_rule_follows_the_config(tiny_data, tmp_path):
    from dptrain.nn.model import build_model
    from dptrain.nn.params import ParamStore
    cfg = tiny_cfg(tiny_data, tmp_path, **WIDE)
    model = build_model(cfg.model, 5, cfg.data.image_size, ParamStore(np.float32), rng=np.random.default_rng(0))
    assert one_host_factored(cfg, model, 3) is model.factor_layer()
    for key, value in [("factored", False), ("transport", "socket")]:
        off = tiny_cfg(tiny_data, tmp_path, **WIDE, **{f"dist__{key}": value})
        assert one_host_factored(off, model, 3) is None
    assert one_host_factored(tiny_cfg(tiny_data, tmp_path, train__batch_invariant_block=8, **WIDE), model, 3) is None


@pytest.mark.timeout(120)
def test_factored_launch_equals_unfactored_to_rounding(tiny_data, tmp_path):
    """3 workers, 10 steps: the factored reduction and the ranks' own weight gradients summed train the same model
    (float32 sums grouped otherwise: not bitwise, close)."""
    kw = dict(dist__workers=3, data__augment=False, **WIDE)
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "fac", **kw)) == 0
    assert launch_inproc(tiny_cfg(tiny_data, tmp_path / "plain", dist__factored=False, **kw)) == 0
    a, b = arrays(tmp_path / "fac"), arrays(tmp_path / "plain")
    assert not np.array_equal(a["params"], b["params"])  # the factored path did run
    assert norm_rel_error(a["params"], b["params"]) < 1e-5
