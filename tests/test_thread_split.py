"""README (Figures): with T threads the im2col copies, BatchNorm, max-pool and Winograd transform passes are split over
T threads (nn/threads.split_rows) with bitwise-identical results: only elementwise work is split. Checked on the whole
model, forward and backward, with BLAS pinned to one thread so that only the split changes (a GEMM's bits can depend
on the BLAS thread count on OpenBLAS's AVX2 kernels: docs/reproducibility.md)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import small_model
from threadpoolctl import threadpool_limits

from dptrain.config import ModelConfig
from dptrain.nn import threads as threads_mod
from dptrain.nn.threads import set_threads

pytestmark = pytest.mark.numerics  # run a second time on the AVX2 kernels: make test-avx2


@pytest.mark.parametrize("algo", ["im2col", "winograd"])
def test_split_passes_give_the_one_thread_bits(algo):
    mcfg = ModelConfig(widths=[16, 32], res_width=32, hidden=16, conv_algo=algo)
    x = np.random.default_rng(1).standard_normal((8, 32, 32, 3)).astype(np.float32)  # big enough to split
    results, handed = [], []
    with threadpool_limits(1, user_api="blas"):
        for threads in (1, 2, 3):
            prev = set_threads(threads)
            try:
                pool = threads_mod._pool
                if pool is not None:  # count the blocks handed to the pool: the split did happen
                    submit = pool.submit
                    pool.submit = lambda *a, _t=threads, _s=submit, **k: (handed.append(_t), _s(*a, **k))[1]
                model, store = small_model(mcfg, size=32, jitter=0.1)
                logits = model.forward(x, train=True).copy()
                model.backward(np.random.default_rng(2).standard_normal(logits.shape).astype(np.float32))
                results.append((logits, store.grads.copy(), store.buffers.copy()))
            finally:
                set_threads(prev)
    assert 2 in handed and 3 in handed
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)
