"""README (Figures): with T threads the im2col copies, BatchNorm, max-pool and Winograd transform passes are split over
T threads (nn/threads.split_rows) with bitwise-identical results: only elementwise work is split. Checked on the whole
model, forward and backward, with BLAS pinned to one thread so that only the split changes (a GEMM's bits can depend
on the BLAS thread count on OpenBLAS's AVX2 kernels: docs/reproducibility.md)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import on_each_thread_count, small_model

from dptrain.config import ModelConfig

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2


@pytest.mark.parametrize("algo", ["im2col", "winograd"])
def test_split_passes_give_the_one_thread_bits(algo):
    mcfg = ModelConfig(widths=[16, 32], res_width=32, hidden=16, conv_algo=algo)
    x = np.random.default_rng(1).standard_normal((8, 32, 32, 3)).astype(np.float32)  # big enough to split

    def compute():
        model, store = small_model(mcfg, size=32, jitter=0.1)
        logits = model.forward(x, train=True).copy()
        model.backward(np.random.default_rng(2).standard_normal(logits.shape).astype(np.float32))
        return logits, store.grads.copy(), store.buffers.copy()
    results, handed = on_each_thread_count(compute)
    assert 2 in handed and 3 in handed
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
