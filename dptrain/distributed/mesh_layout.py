"""The mesh's fixed cuts, shared by the agents (mesh.py), the coordinator (mesh_plane.py), the replay and the
planner: each host's slice of the flat buffer, the pieces the reduce-scatter and the all-gather send, and which way
the factored Linear travels (as factors; updated by its rows' owners or on every host). Pure functions of the model,
the plane and the batch: what travels (and, with float16, how it is scaled) never depends on timing."""
from __future__ import annotations

import numpy as np

from ..optim import CHUNK, chunk_slices

# At most this many elements (4 MiB of float32) per message: CURVE encrypts a whole message before its first byte
# leaves (and decrypts it only once all of it is in), so big messages put the CPU and the wire in series
PIECE = 16 * CHUNK
# The all-gather's pieces are smaller (1 MiB of float32): the workers wait on the all-gather, and sealed with AES-GCM
# its cost beyond the wire is about three pieces' sealing and opening (the first sealed before a byte leaves, the
# last opened after its last byte is in; bench/cipher_pipeline.py, figures in docs/performance-notes.md, plan). The
# reduce-scatter runs under backward.
GATHER_PIECE = 4 * CHUNK


def factor_span(w0: int, K: int, F: int, lo: int, hi: int) -> tuple[int, int, int, int] | None:
    """Of the factored K x F weight at flat offset w0: the part [a, b) inside the slice [lo, hi) and the rows
    [k0, k1) of W it covers (the columns of X its owner needs); None when the slice holds none of it."""
    a, b = max(lo, w0), min(hi, w0 + K * F)
    return (a, b, (a - w0) // F, -(-(b - w0) // F)) if a < b else None


def dw_span(x: np.ndarray, dy: np.ndarray, w0: int, F: int, span: tuple[int, int, int, int]) -> np.ndarray:
    """The flat [a, b) of dW = x^T dy for a factor_span, x holding the inputs' columns k0..k1 (every sample of the
    batch, host order): one GEMM. The agents and the replay both call it, so their bits are the same."""
    a, b, k0, _ = span
    off = a - w0 - k0 * F
    return np.matmul(x.T, dy).ravel()[off:off + b - a]  # (k1 - k0, n) @ (n, F)


def factors_pay(batch: int, hosts: int, rows: int, cols: int) -> bool:
    """Do a (rows x cols) Linear's factors cost a host's link fewer bytes than its weight gradient's reduce-scatter?
    A host sends its samples' inputs (b x rows, split over the owners) and output gradients (b x cols, to each other
    owner) instead of (H-1)/H of rows x cols: worth it while b < ~cols (at most ceil(batch / H) samples a host)."""
    b = -(-batch // max(hosts, 1))
    return hosts > 1 and b * (rows + (hosts - 1) * cols) < (hosts - 1) * rows * cols / hosts


# dist.factor_update = "auto" replicates the factored Linear's update only up to this global batch: every host then
# computes the whole dW = X^T dY (2·B flops per weight, a GEMM) and updates all of W (one SGD pass) instead of its
# rows and an all-gather of W. Per weight that is 2·B flops + ~4 ns against sending and sealing 4 bytes: at 10 Gbit/s
# (3.4 ns on the wire, ~7 ns sealing + opening with AES-GCM) the one-core GEMM (~50-100 GFLOP/s) breaks even near
# B = 256; at 1 Gbit/s far above it. `dptrain plan` models both (--dist.factor_update) for a given cluster.
REPLICATE_MAX_BATCH = 256


def replicate_pays(batch: int, hosts: int, rows: int, cols: int, wire_bytes: int, mode: str = "auto") -> bool:
    """Does every host compute and update the factored (rows x cols) Linear's weights itself (no all-gather of that
    layer), given dist.factor_update `mode`? "auto": when the batch is small (REPLICATE_MAX_BATCH) and a host's link
    carries fewer bytes that way: its samples' inputs and output gradients to every other host, ceil(B/H)·(rows +
    cols) floats each, instead of the owners' share of them plus (H-1)/H of the layer's weights in the all-gather."""
    if hosts < 2 or mode == "owners":
        return False
    if mode == "replicated":
        return True
    b = -(-batch // hosts)
    owners = b * (rows * (hosts - 1) / hosts + (hosts - 1) * cols) * 4 + (hosts - 1) / hosts * rows * cols * wire_bytes
    return batch <= REPLICATE_MAX_BATCH and (hosts - 1) * b * (rows + cols) * 4 < owners


def plane_slices(size: int, hosts: int, replicated: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Each host's slice [lo, hi) of the flat buffer, on CHUNK boundaries, in host order. Without a replicated layer,
    as even as the blocks allow (optim.chunk_slices). With one ([w0, w1): every host updates it, none of it travels),
    even in the *other* parameters, whose reduce-scatter and all-gather are what the links carry: an even cut of the
    whole buffer would leave the host whose slice holds them (the convolutions, before the hidden Linear) sending
    them to every other host, (H - 1) times its share."""
    if replicated is None:
        return chunk_slices(size, hosts)
    w0, w1 = replicated
    rest = size - (w1 - w0)

    def flat(t: float) -> int:  # position t among the other parameters -> flat offset, rounded to a block
        at = t if t <= w0 else t + (w1 - w0)
        return min(size, int(round(at / CHUNK)) * CHUNK)
    cuts = [0] + [flat(rest * r / hosts) for r in range(1, hosts)] + [size]
    for i in range(1, len(cuts)):
        cuts[i] = max(cuts[i], cuts[i - 1])
    return list(zip(cuts, cuts[1:]))


def sync_ranges(slices: list[tuple[int, int]], replicated: tuple[int, int] | None) -> list[list[tuple[int, int]]]:
    """What each host uploads at a SYNC (its weights and momentum there): its slice; with a replicated layer (every
    host holds all of it, weights and momentum alike) its slice without that layer, plus an even 1/H share of it, so
    that no host uploads the whole layer."""
    if replicated is None:
        return [[s] for s in slices]
    w0, w1 = replicated
    H = len(slices)
    shares = [(w0 + (w1 - w0) * h // H, w0 + (w1 - w0) * (h + 1) // H) for h in range(H)]
    out = []
    for (lo, hi), share in zip(slices, shares):
        parts = [(a, b) for a, b in ((lo, min(hi, w0)), (max(lo, w1), hi)) if a < b]
        out.append(sorted(parts + ([share] if share[0] < share[1] else [])))
    return out


def take_ranges(array: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """array over `ranges`, in their order (a view when there is one)."""
    if len(ranges) == 1:
        return array[ranges[0][0]:ranges[0][1]]
    return np.concatenate([array[a:b] for a, b in ranges])


def scatter_pieces(starts, size: int, slices: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The reduce-scatter's fixed pieces of a flat buffer of `size`: cut at the layers' `starts`, at every slice bound
    (slices: (host index, lo, hi)) and every PIECE elements; each (lo, hi, owner's host index), in flat order. Fixed
    by the model and the plane alone, so what travels (and, with float16, how it is scaled) never depends on timing."""
    cuts = sorted({s for s in starts if s is not None} | {0, size} | {b for _, lo, hi in slices for b in (lo, hi)}
                  | set(range(0, size, PIECE)))
    return [(a, b, next(i for i, lo, hi in slices if lo <= a and b <= hi)) for a, b in zip(cuts, cuts[1:]) if b > a]


def gather_pieces(lo: int, hi: int, cuts: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """An owner's slice in GATHER_PIECE-element pieces, also cut at `cuts` (the factored Linear's bounds: its pieces
    are its alone, so a replicated update rounds them as their owner does): a fixed cut, so float16 scales are too."""
    bounds = sorted({lo, hi} | set(range(lo, hi, GATHER_PIECE)) | {c for c in cuts if lo < c < hi})
    return list(zip(bounds, bounds[1:]))
