"""Winograd F(2x2, 3x3) (nn/winograd.py) against the im2col reference (conv.py), float64 arithmetic, centred finite
differences and PyTorch autograd; odd sizes, batch 1, workspace reuse, thread-count invariance, and conv_algo="auto"
choosing by shape.

float32 bound: rel_error (max|a - b| / max|b|) < F32_TOL = 1e-5 (~84 float32 eps) for out, dx and dW against a float64
reference and against float32 im2col. Measured worst over the default model's layer shapes (3 seeds): 8.7e-7
(im2col's own: 7.2e-7); worst of all: dW of the 3-channel 64x64 layer, 3.4e-6 (G^T dU G cancels part of dU, which
sums 3 * 32 * 32 tiles); hence 1e-5. float64: < 1e-12 against im2col (measured ~1e-15).
"""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_kernel, rel_error
from helpers import on_each_thread_count, small_model
from threadpoolctl import threadpool_limits

from dptrain.config import ModelConfig
from dptrain.nn import conv, layers as L, threads as threads_mod, winograd
from dptrain.nn.model import build_model
from dptrain.nn.params import ParamStore
from dptrain.nn.threads import set_threads
from dptrain.nn.workspace import Workspace

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2

F32_TOL = 1e-5
F64_TOL = 1e-12

CASES = [  # (N, H, W, C, F): even, odd and 1-pixel sizes, batch 1, the default model's channel counts (small N)
    (2, 8, 8, 4, 3), (1, 5, 7, 3, 2), (3, 7, 6, 2, 5), (1, 1, 1, 2, 3), (2, 2, 3, 1, 1), (1, 3, 1, 4, 2),
    (2, 32, 32, 32, 64), (2, 16, 16, 64, 128), (2, 8, 8, 128, 256), (1, 8, 8, 256, 256), (2, 9, 11, 16, 8),
    (5, 32, 32, 32, 64),  # 4 MiB chunks: forward 2+2+1 images, dx 3+2
]


def _run(fwd, bwd, x, w, b, dout, need_dx=True, ws=None):
    out, cache = fwd(x, w, b, ws)
    out = out.copy()
    dx, dw, db = bwd(dout, cache, need_dx, ws)
    return out, None if dx is None else dx.copy(), dw.copy(), None if db is None else db.copy()


def im2col(x, w, b, dout, need_dx=True, ws=None):
    return _run(lambda x, w, b, ws: conv.conv2d_forward(x, w, b, 1, 1, ws),
                lambda d, c, n, ws: conv.conv2d_backward(d, c, n, ws), x, w, b, dout, need_dx, ws)


def wino(x, w, b, dout, need_dx=True, ws=None):
    return _run(winograd.winograd_forward, winograd.winograd_backward, x, w, b, dout, need_dx, ws)


def data(case, dtype, seed=0):
    N, H, W, C, F = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, C))
    w = rng.standard_normal((3, 3, C, F)) / np.sqrt(9 * C)
    b = rng.standard_normal(F)
    dout = rng.standard_normal((N, H, W, F))
    return tuple(a.astype(dtype) for a in (x, w, b, dout))


@pytest.mark.parametrize("case", CASES)
def test_float64_matches_im2col(case):
    ref, got = im2col(*data(case, np.float64)), wino(*data(case, np.float64))
    for name, r, g in zip(("out", "dx", "dw", "db"), ref, got):
        assert g.shape == r.shape, name
        assert rel_error(g, r) < F64_TOL, name


@pytest.mark.parametrize("case", CASES)
def test_float32_within_bound(case):
    ref = im2col(*data(case, np.float64))
    got, base = wino(*data(case, np.float32)), im2col(*data(case, np.float32))
    for name, r, g, i in zip(("out", "dx", "dw", "db"), ref, got, base):
        assert g.dtype == np.float32, name
        assert rel_error(g, r) < F32_TOL, name
        assert rel_error(g, i) < F32_TOL, name


@pytest.mark.parametrize("case", [(2, 5, 6, 3, 4), (1, 4, 4, 2, 3), (2, 3, 5, 1, 2), (1, 1, 2, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(case, bias):
    x, w, b, _ = data(case, np.float64, seed=hash(case) % 2**32)
    ws = Workspace()
    check_kernel(winograd.winograd_forward, lambda d, c: winograd.winograd_backward(d, c, ws=ws),
                 (x, w, b if bias else None), ws)


@pytest.mark.parametrize("chunk_images", [1, 2, 3])
def test_chunks_and_partial_last_chunk(monkeypatch, chunk_images):
    """The batch is processed in chunks of whole images (5 images: chunks of 1; 2+2+1; 3+2), forward and dx."""
    case = (5, 6, 7, 4, 3)
    N, H, W, C, F = case
    th, tw = winograd._tiles(H, W)
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_images * 4 * ((2 * th + 2) * (2 * tw + 2) * max(C, F)
                                                                      + 4 * th * (2 * tw + 2) * max(C, F)
                                                                      + 16 * th * tw * max(C, F)))
    assert winograd._chunk(N, th, tw, C, F) == chunk_images == winograd._chunk(N, th, tw, F, C)
    ref, got = im2col(*data(case, np.float64)), wino(*data(case, np.float64), ws=Workspace())
    for r, g in zip(ref, got):
        assert rel_error(g, r) < F64_TOL


def test_workspace_reuse_and_skip_dx():
    """Buffers reused across calls (zero borders kept, odd-size gradient padding kept zero); need_dx=False; in-place
    gradient outputs."""
    ws = Workspace()
    for seed in range(3):
        for case in ((2, 5, 7, 3, 4), (2, 6, 6, 3, 4)):
            x, w, b, dout = data(case, np.float64, seed)
            ref = im2col(x, w, b, dout)
            got = wino(x, w, b, dout, ws=ws)
            for r, g in zip(ref, got):
                assert rel_error(g, r) < F64_TOL
    out, cache = winograd.winograd_forward(x, w, b, ws)
    dw_out, db_out = np.full_like(w, 7.0), np.full_like(b, 7.0)
    dx, dw, db = winograd.winograd_backward(dout, cache, need_dx=False, ws=ws, dw_out=dw_out, db_out=db_out)
    assert dx is None and dw is dw_out and db is db_out
    assert rel_error(dw_out, ref[2]) < F64_TOL and rel_error(db_out, ref[3]) < F64_TOL


def test_thread_count_does_not_change_bits():
    """Only elementwise work is split over threads (BLAS pinned to 1 thread here): bitwise equal results."""
    case = (8, 16, 16, 32, 32)  # chunks big enough for split_rows to split
    x, w, b, dout = data(case, np.float32)
    results, submitted = on_each_thread_count(lambda: wino(x, w, b, dout, ws=Workspace()))
    assert 2 in submitted and 3 in submitted
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert np.array_equal(a, c)


def test_choose_algo_by_shape():
    """By the layer's kernel, stride, padding and input channels: the input (its batch) is not even an argument."""
    c = conv.WINOGRAD_MIN_CHANNELS
    assert conv.choose_algo("auto", (3, 3, c, 4), 1, 1) == "winograd"
    assert conv.choose_algo("auto", (3, 3, 3, 32), 1, 1) == "im2col"
    assert conv.choose_algo("auto", (3, 3, c - 1, 4), 1, 1) == "im2col"
    assert conv.choose_algo("winograd", (3, 3, 3, 32), 1, 1) == "winograd"
    assert conv.choose_algo("im2col", (3, 3, 256, 256), 1, 1) == "im2col"
    for w_shape, stride, pad in (((3, 3, 64, 64), 2, 1), ((3, 3, 64, 64), 1, 0), ((1, 1, 64, 64), 1, 0),
                                 ((5, 5, 64, 64), 1, 2)):
        for algo in ("auto", "winograd"):  # not applicable: im2col
            assert conv.choose_algo(algo, w_shape, stride, pad) == "im2col"
    with pytest.raises(ValueError):
        conv.choose_algo("fft", (3, 3, 64, 64), 1, 1)


@pytest.mark.parametrize("algo", ["auto", "im2col", "winograd"])
def test_model_layers_take_the_chosen_path(algo):
    """build_model passes model.conv_algo to every conv; after a forward each conv's cache says which path ran."""
    mcfg = ModelConfig(widths=[8, 16, 64], res_width=96, hidden=8, conv_algo=algo)  # auto: res.* (64, 96 channels)
    model = build_model(mcfg, 5, 16, ParamStore(np.float32), rng=np.random.default_rng(0))
    model.forward(np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32), train=True)
    convs = {m.w.name: m for m in model.layers() if isinstance(m, L.Conv2D)}
    for name, m in convs.items():
        C, k = m.w.data.shape[2], m.w.data.shape[0]
        wino_expected = k == 3 and (algo == "winograd" or (algo == "auto" and C >= conv.WINOGRAD_MIN_CHANNELS))
        assert isinstance(m.cache, winograd.WinoCache) == wino_expected, name
    assert isinstance(convs["res.short.conv.w"].cache, conv.ConvCache)
    if algo == "auto":
        assert isinstance(convs["block1.conv.w"].cache, conv.ConvCache)
        assert isinstance(convs["res.conv2.w"].cache, winograd.WinoCache)


def test_model_float64_winograd_equals_im2col():
    """The whole small model in float64: logits and every gradient agree between the two algorithms."""
    outs = []
    for algo in ("im2col", "winograd"):
        mcfg = ModelConfig(widths=[8, 16], res_width=16, hidden=8, conv_algo=algo)
        model, store = small_model(mcfg, dtype=np.float64, jitter=0.1)
        x = np.random.default_rng(1).standard_normal((3, 16, 16, 3))
        logits = model.forward(x, train=True).copy()
        model.backward(np.random.default_rng(2).standard_normal(logits.shape))
        outs.append((logits, store.grads.copy()))
    assert rel_error(outs[1][0], outs[0][0]) < 1e-10
    assert rel_error(outs[1][1], outs[0][1]) < 1e-10


@pytest.mark.parametrize("case", [(2, 9, 7, 5, 6), (3, 8, 8, 4, 6), (1, 6, 5, 1, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_against_torch_autograd(case, bias):
    torch = pytest.importorskip("torch")
    N, H, W, C, F = case
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal((N, H, W, C)), rng.standard_normal((N, H, W, F))
    store = ParamStore(np.float64)
    layer = L.Conv2D(store, "c", C, F, 3, 1, 1, bias=bias, init="pytorch", algo="winograd")
    store.allocate(rng)
    out = layer.forward(x, True).copy()
    dx = layer.backward(dout)
    assert isinstance(layer.cache, winograd.WinoCache)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    wt = torch.from_numpy(layer.w.data.transpose(3, 2, 0, 1).copy()).requires_grad_(True)  # (F, C, kh, kw)
    bt = torch.from_numpy(layer.b.data.copy()).requires_grad_(True) if bias else None
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=1, padding=1)
    (yt * torch.from_numpy(dout.transpose(0, 3, 1, 2).copy())).sum().backward()
    assert rel_error(out, yt.detach().numpy().transpose(0, 2, 3, 1)) < 1e-10
    assert rel_error(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-10
    assert rel_error(layer.w.grad, wt.grad.numpy().transpose(2, 3, 1, 0)) < 1e-10
    if bias:
        assert rel_error(layer.b.grad, bt.grad.numpy()) < 1e-10


@pytest.mark.parametrize("blas", [1, 2])
@pytest.mark.parametrize("case, by_chunks", [((5, 7, 9, 24, 16), False), ((5, 12, 11, 4, 8), True)])
def test_chunks_spread_over_threads_give_the_same_bits(monkeypatch, blas, case, by_chunks):
    """Several chunks and several threads: each thread takes whole chunks (its own buffers, one BLAS thread); the
    forward, dx and dW bits equal one thread's (with 2 BLAS threads too at these small sizes; a larger GEMM's bits
    can change with the BLAS thread count on OpenBLAS's AVX2 kernels), with a partial last chunk and an odd size; dW
    from a whole-batch dM, or (few channels, many tiles) from the chunks' own products added in chunk order."""
    N, H, W, C, F = case
    th, tw = winograd._tiles(H, W)
    assert (2 * 3 * C <= N * th * tw) is by_chunks  # 3 chunks of partial dU against one whole-batch dM
    calls = []
    filter_grad = winograd._filter_grad
    monkeypatch.setattr(winograd, "_filter_grad", lambda *a: (calls.append(a[3]), filter_grad(*a)))
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 2 * 4 * ((2 * th + 2) * (2 * tw + 2) * max(C, F)
                                                          + 4 * th * (2 * tw + 2) * max(C, F)
                                                          + 16 * th * tw * max(C, F)))
    assert winograd._chunk(N, th, tw, C, F) == 2 == winograd._chunk(N, th, tw, F, C)  # chunks 2 + 2 + 1
    x, w, b, dout = data(case, np.float32)
    results, handed = [], []
    with threadpool_limits(blas):
        for threads in (1, 2, 3):
            prev = set_threads(threads)
            try:
                pool = threads_mod._pool
                if pool is not None:
                    submit = pool.submit
                    pool.submit = lambda *a, **k: (handed.append(threads), submit(*a, **k))[1]
                results.append(wino(x, w, b, dout, ws=Workspace()))
            finally:
                set_threads(prev)
    assert handed.count(2) >= 2 and handed.count(3) >= 4  # forward and dx: 1 and 2 chunk runs handed over
    assert calls == [2 if by_chunks else N] * 3  # chunks of 2 images, or the whole batch as one
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert np.array_equal(a, c)


@pytest.mark.parametrize("case", [(64, 32, 32, 32, 64), (64, 16, 16, 64, 128)])
def test_chunked_layers_give_the_same_bits_on_one_and_two_threads(case):
    """README (Figures): the 32x32 and 16x16 layers of the default model at batch 64, whose weight gradient is the
    chunks' products added in chunk order, give the same bits on 1 thread as on 2 (nn threads = BLAS threads, as
    match_blas_threads sets a process up): each thread's chunks run their GEMMs on one BLAS thread, as one thread's
    do. Also on the AVX2 kernels, where a GEMM's bits can change with the BLAS thread count (make test-avx2)."""
    N, H, W, C, F = case
    th, tw = winograd._tiles(H, W)
    assert 2 * 3 * C <= N * th * tw  # the chunked weight gradient, not a whole-batch dM
    x, w, b, dout = data(case, np.float32)
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            prev = set_threads(threads)
            try:
                results.append(wino(x, w, b, dout, ws=Workspace()))
            finally:
                set_threads(prev)
    for a, c in zip(*results):
        assert np.array_equal(a, c)
