"""ABBA micro benchmark of optim.sum_of_squares against the float32-dot version it replaced (issue 27), on the default
model's parameter count. Usage: python bench/avx2/norm_abba.py THREADS ROUNDS (THREADS: BLAS limit and nn threads).
Prints each version's median and minimum per call and the median of the paired new/old ratios."""
import math
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from dptrain.nn import threads
from dptrain.optim import CHUNK, add_blocks, sum_of_squares as new

P = 9_453_956  # the default model's parameters (64x64, 62 classes)


def old_chunk_squares(g: np.ndarray) -> np.ndarray:
    """The replaced version: a float32 BLAS dot per block, redone in float64 where it overflowed."""
    parts = np.empty(-(-g.size // CHUNK), np.float64)
    with np.errstate(over="ignore"):
        for i, lo in enumerate(range(0, g.size, CHUNK)):
            part = g[lo:lo + CHUNK]
            parts[i] = float(np.dot(part, part))
            if not math.isfinite(parts[i]) and g.dtype != np.float64:
                wide = part.astype(np.float64)
                parts[i] = float(np.dot(wide, wide))
    return parts


def old(g: np.ndarray) -> float:
    return add_blocks(old_chunk_squares(g))


def main(n: int, rounds: int) -> None:
    threadpool_limits(n, user_api="blas")
    threads.set_threads(n)
    g = (np.random.default_rng(0).standard_normal(P) * 1e-2).astype(np.float32)
    ta, tb = [], []
    for _ in range(rounds):
        for f, t in ((old, ta), (new, tb), (new, tb), (old, ta)):
            s = time.perf_counter()
            f(g)
            t.append(time.perf_counter() - s)
    ratio = statistics.median([b / a for a, b in zip(ta, tb)])
    print(f"threads {n}: old median {statistics.median(ta) * 1e3:.2f} ms (min {min(ta) * 1e3:.2f}), new median "
          f"{statistics.median(tb) * 1e3:.2f} ms (min {min(tb) * 1e3:.2f}); paired ratio new/old {ratio:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
