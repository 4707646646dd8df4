"""Do a GEMM's bits depend on the BLAS thread count, or on cutting it into row blocks? (docs/reproducibility.md)
Run as is (this CPU's kernels) and with OPENBLAS_CORETYPE=Haswell (OpenBLAS's AVX2 kernels). Prints, per shape
(M, K, N) of A @ B, how many entries differ between 1 and 2 BLAS threads, and for the hidden Linear's weight gradient
x.T @ dy (x: batch x 1024, dy: batch x 512) whether 128-row blocks (reduce.factored_rows) give the one product's bits;
then times the default model's 16384 x 512 layer at batch 64 both ways, alternated (argv[1] rounds, default 12)."""
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from dptrain.distributed.reduce import Factors, factored_rows

rng = np.random.default_rng(0)
print("OpenBLAS", [i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"])
for M, K, N in [(1024, 16, 512), (512, 64, 512), (256, 64, 256), (64, 64, 64), (128, 576, 1024), (1024, 576, 128)]:
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    r = {}
    for t in (1, 2):
        with threadpool_limits(t, user_api="blas"):
            r[t] = a @ b
    print((M, K, N), "entries differing between 1 and 2 threads:", int((r[1] != r[2]).sum()))
for batch in (16, 64):
    x, dy = rng.standard_normal((batch, 1024)).astype(np.float32), rng.standard_normal((batch, 512)).astype(np.float32)
    for t in (1, 2):
        with threadpool_limits(t, user_api="blas"):
            full = x.T @ dy
            blocks = np.concatenate([np.ascontiguousarray(x[:, k:k + 128]).T @ dy for k in range(0, 1024, 128)])
        print(f"batch {batch}, {t} thread(s): 128-row blocks give the one product's bits:", np.array_equal(full, blocks))

K, F, B = 16384, 512, 64
x, dy = rng.standard_normal((B, K)).astype(np.float32), rng.standard_normal((B, F)).astype(np.float32)
g = np.zeros(K * F + 100, np.float32)
dw = g[100:].reshape(K, F)


def one():
    np.matmul(x.T, dy, out=dw)


def rows():
    factored_rows(g, 100, 100 + K * F, Factors(100, K, F, [x], [dy]))


ta, tb = [], []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
    for f, t in ((one, ta), (rows, tb), (rows, tb), (one, ta)):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
print(f"16384 x 512 at batch 64: one GEMM median {statistics.median(ta) * 1e3:.1f} ms, 128-row blocks "
      f"{statistics.median(tb) * 1e3:.1f} ms")
