"""Winograd minimal filtering F(2x2, 3x3) (Lavin & Gray 2016) for stride-1, pad-1 3x3 convolutions, NHWC.

x: (N, H, W, C), w: (3, 3, C, F), out: (N, H, W, F): the same function as conv.conv2d_forward(x, w, b, 1, 1).

Math. The output is cut into 2x2 tiles (th x tw = ceil(H/2) x ceil(W/2) per image; odd sizes: the padded input gets
extra zero rows/columns and the last tile's extra outputs are cropped). Tile (i, j) reads the 4x4 window d at rows
2i..2i+3, columns 2j..2j+3 of the zero-padded input xp (pad 1 on the top/left, 1 or 2 on the bottom/right), and
  Y = A^T [(G g G^T) * (B^T d B)] A      (per channel pair, * elementwise over the 4x4 positions, summed over C)
  B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
  G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
  A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
so each of the 16 positions p = (a, b) is one GEMM over channels: M[p] = V[p] @ U[p], with V: (16, T, C) the
transformed input (T = N*th*tw tiles, in (n, i, j) order), U: (16, C, F) the transformed filter, M: (16, T, F):
16 * T * C * F multiply-adds instead of im2col's 9 * 4 * T * C * F (2.25x fewer). Every transform is two separable
stages (rows, then columns), each a handful of whole-array numpy adds/subtracts on strided views with out= buffers
(B^T and A^T are 0/+-1: no multiplications).

Gradients. dW: the adjoint of both maps: dM = A dY A^T per tile (dY: the 2x2 output-gradient tile), the GEMM
dU[p] = V[p]^T @ dM[p] (V kept from the forward), then dg = G^T dU G. dx: for stride 1 and pad 1 the input gradient is
the same convolution of dout with the spatially flipped, channel-transposed kernel, so it reuses the forward.

Work is done in chunks of whole images (`_chunk`, from the layer's shape only) so the padded copy, the row-stage
buffer and M stay in cache (a full-batch M is much slower to write than cache-resident chunks); V
(needed by dW) is full-batch. dW's dM is made chunk by chunk too, each chunk's product V^T dM into a slot of its
own, the slots added in chunk order, where those slots (chunks x C x F x 16) are at most half of a whole-batch dM
(T x F x 16): the 32x32 and 16x16 layers, where that moves less memory; the 8x8 layers, with few tiles and many channels, take the whole batch as
one chunk. The elementwise transforms of a chunk are split over its rows of tiles (or, for dM, its images) with
threads.split_rows (disjoint outputs) when one thread has the chunks; GEMMs are numpy/BLAS. Nothing depends on the
thread count. For odd H or W the forward output is a view (the interior of a (N, 2th, 2tw, F) buffer), like
conv.py's col2im dx.

float32 error (max|err| / max|ref| against float64): <= 8.7e-7 on the default model's layers (im2col: 7.2e-7),
3.4e-6 for dW of a 3-channel 64x64 layer; tests/test_winograd.py bounds it by 1e-5. F(4x4, 3x3) (6x6 tiles, 36
GEMMs, 4x fewer multiplies than im2col) was prototyped with GEMM-based transforms: faster than im2col on the larger
layers on 1 thread but no better than F(2x2) at 8x8, slower than im2col at 32x32 on 2 threads, and its float32
error is 15-25x larger (1.2e-5): not kept (docs/performance-notes.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .functional import colsum
from .threads import each_thread, split_rows, threads
from .workspace import Workspace, scratch

CHUNK_BYTES = 1 << 22  # per-chunk working set (padded copy + row stage + M): small enough to stay in cache


class WinoCache(NamedTuple):
    x_shape: tuple[int, int, int, int]  # (N, H, W, C)
    V: np.ndarray  # (16, T, C) transformed input tiles (a workspace buffer)
    U: np.ndarray  # (16, C, F) the transformed filter (a workspace buffer): dx's filter is it, positions swapped
    has_bias: bool


def supported(kh: int, kw: int, stride: int, pad: int) -> bool:
    return kh == kw == 3 and stride == 1 and pad == 1


def _tiles(H: int, W: int) -> tuple[int, int]:
    return (H + 1) // 2, (W + 1) // 2


def _chunk(N: int, th: int, tw: int, C: int, F: int) -> int:
    """Images per chunk: a function of the layer's shape alone."""
    per_image = 4 * ((2 * th + 2) * (2 * tw + 2) * C + 4 * th * (2 * tw + 2) * C + 16 * th * tw * F)
    return max(1, min(N, CHUNK_BYTES // per_image))


def filter_transform(w: np.ndarray, ws: Workspace | None = None, tag: str = "wino") -> np.ndarray:
    """(3, 3, C, F) -> U (16, C, F) = G g G^T per (c, f), positions in (a, b) row-major order (workspace buffers:
    a fresh 4 MB array a call costs its page faults, about as much as the transform, on the small batches)."""
    _, _, C, F = w.shape
    half = w.dtype.type(0.5)
    r = scratch(ws, f"{tag}.Ur", (4, 3, C, F), w.dtype)  # rows: G g
    np.copyto(r[0], w[0])
    np.copyto(r[3], w[2])
    np.add(w[0], w[2], out=r[1])
    np.subtract(r[1], w[1], out=r[2])
    r[1] += w[1]
    r[1:3] *= half
    U = scratch(ws, f"{tag}.U", (4, 4, C, F), w.dtype)  # columns: (G g) G^T
    np.copyto(U[:, 0], r[:, 0])
    np.copyto(U[:, 3], r[:, 2])
    np.add(r[:, 0], r[:, 2], out=U[:, 1])
    np.subtract(U[:, 1], r[:, 1], out=U[:, 2])
    U[:, 1] += r[:, 1]
    U[:, 1:3] *= half
    return U.reshape(16, C, F)


# filter_transform of the spatially flipped kernel: G flip(v) = J G v, J swapping entries 0 and 3 (entries 1 and 2
# are symmetric in v0, v2; IEEE addition commutes), so its U is U's positions (a, b) -> (SWAP[a], SWAP[b]), bit for
# bit, with the channels transposed. dx's convolution therefore multiplies by U itself (a transposed view) and has
# its input transform write, and its output transform read, the positions in that order: no permuted copy of U.
SWAP = (3, 1, 2, 0)
SAME = (0, 1, 2, 3)  # the forward's own order


def filter_adjoint(dU: np.ndarray, out: np.ndarray | None = None, ws: Workspace | None = None) -> np.ndarray:
    """(16, C, F) -> dg (3, 3, C, F) = G^T dU G: the adjoint of filter_transform."""
    _, C, F = dU.shape
    dU = dU.reshape(4, 4, C, F)
    half = dU.dtype.type(0.5)
    s = np.add(dU[1], dU[2], out=scratch(ws, "wino.adj_s", (4, C, F), dU.dtype))  # (4, C, F) over columns
    s *= half
    r = scratch(ws, "wino.adj_r", (3, 4, C, F), dU.dtype)  # rows: G^T dU
    np.add(dU[0], s, out=r[0])
    np.add(dU[3], s, out=r[2])
    np.subtract(dU[1], dU[2], out=r[1])
    r[1] *= half
    dg = np.empty((3, 3, C, F), dU.dtype) if out is None else out
    s = np.add(r[:, 1], r[:, 2], out=scratch(ws, "wino.adj_s2", (3, C, F), dU.dtype))  # (3, C, F)
    s *= half
    np.add(r[:, 0], s, out=dg[:, 0])
    np.add(r[:, 3], s, out=dg[:, 2])
    np.subtract(r[:, 1], r[:, 2], out=dg[:, 1])
    dg[:, 1] *= half
    return dg


def _input_transform(xp, R, V6, lo, hi, s=SAME):
    """Tile rows lo:hi of the padded chunk xp (n, 2th+2, 2tw+2, C) -> V6[:, :, :, lo:hi] ((4, 4, n, th, tw, C)) =
    B^T d B per tile, position (a, b) stored at (s[a], s[b]) (s = SWAP: the positions as the flipped filter's
    transform orders them). R: (4, n, th, 2tw+2, C) row-stage buffer (rows lo:hi written)."""
    tw = V6.shape[4]
    R = R[:, :, lo:hi]
    d0, d1, d2, d3 = (xp[:, 2 * lo + k:2 * hi + k:2] for k in range(4))  # (n, hi-lo, 2tw+2, C): row k of each tile
    np.subtract(d0, d2, out=R[s[0]])
    np.add(d1, d2, out=R[s[1]])
    np.subtract(d2, d1, out=R[s[2]])
    np.subtract(d1, d3, out=R[s[3]])
    c0, c1, c2, c3 = (R[:, :, :, k:k + 2 * tw:2] for k in range(4))  # (4, n, hi-lo, tw, C): column k
    V = V6[:, :, :, lo:hi]
    np.subtract(c0, c2, out=V[:, s[0]])
    np.add(c1, c2, out=V[:, s[1]])
    np.subtract(c2, c1, out=V[:, s[2]])
    np.subtract(c1, c3, out=V[:, s[3]])


def _output_transform(M6, T, Y6, s=SAME):
    """M6: (4, 4, n, th, tw, F), position (a, b) at (s[a], s[b]) -> Y6 (2, 2, n, th, tw, F) = A^T m A per tile.
    T: (2, 4, n, th, tw, F) buffer (its column axis in M6's order)."""
    np.add(M6[s[1]], M6[s[2]], out=T[0])
    np.subtract(M6[s[1]], M6[s[2]], out=T[1])
    T[0] += M6[s[0]]
    T[1] -= M6[s[3]]
    np.add(T[:, s[1]], T[:, s[2]], out=Y6[:, 0])
    np.subtract(T[:, s[1]], T[:, s[2]], out=Y6[:, 1])
    Y6[:, 0] += T[:, s[0]]
    Y6[:, 1] -= T[:, s[3]]


def _output_adjoint(dY6, T, dM6):
    """dY6: (2, 2, n, th, tw, F) -> dM6 (4, 4, n, th, tw, F) = A dy A^T per tile. T: (4, 2, n, th, tw, F) buffer."""
    np.copyto(T[0], dY6[0])
    np.add(dY6[0], dY6[1], out=T[1])
    np.subtract(dY6[0], dY6[1], out=T[2])
    np.negative(dY6[1], out=T[3])
    np.copyto(dM6[:, 0], T[:, 0])
    np.add(T[:, 0], T[:, 1], out=dM6[:, 1])
    np.subtract(T[:, 0], T[:, 1], out=dM6[:, 2])
    np.negative(T[:, 1], out=dM6[:, 3])


def _tiled(a: np.ndarray, th: int, tw: int) -> np.ndarray:
    """(n, 2th, 2tw, F) -> the (2, 2, n, th, tw, F) view: [a, b, n, i, j] = pixel (2i + a, 2j + b)."""
    n, _, _, F = a.shape
    return a.reshape(n, th, 2, tw, 2, F).transpose(2, 4, 0, 1, 3, 5)


def _conv(x, U, ws, tag, V=None, s=SAME):
    """The Winograd convolution of x (N, H, W, C) with U (16, C, F) -> (N, H, W, F) (a workspace buffer or a view
    of one), writing the transformed input into V (16, T, C) when given (the forward keeps it for dW). s = SWAP:
    U's positions are those of the flipped kernel (dx's convolution, U a transposed view of the forward's).

    With several threads and several chunks, each thread takes whole chunks (t, t + threads, ...) with buffers of
    its own and one BLAS thread: a chunk's GEMMs are small and its passes short, so splitting each chunk's rows
    over the threads (the one-chunk case) scaled poorly. The same operations on the same data either way: the same bits."""
    N, H, W, C = x.shape
    F = U.shape[2]
    th, tw = _tiles(H, W)
    nb = _chunk(N, th, tw, C, F)
    chunks = list(range(0, N, nb))
    nt = min(threads(), len(chunks))
    keep = V is not None
    if V is None:
        V = scratch(ws, f"{tag}.V", (nt, 16, nb * th * tw, C), x.dtype)
    even = H == 2 * th and W == 2 * tw
    out = scratch(ws, f"{tag}.out", (N, 2 * th, 2 * tw, F), x.dtype)

    def run(t):  # thread t's chunks; their passes split over rows when it is the only thread (split_rows)
        sfx = f"{tag}.{t}" if t else tag
        xp = scratch(ws, f"{sfx}.xp", (nb, 2 * th + 2, 2 * tw + 2, C), x.dtype, zero_new=True)
        R = scratch(ws, f"{sfx}.R", (4, nb, th, 2 * tw + 2, C), x.dtype)
        M = scratch(ws, f"{sfx}.M", (16, nb * th * tw, F), x.dtype)
        T = scratch(ws, f"{sfx}.T", (2, 4, nb, th, tw, F), x.dtype)
        for n0 in chunks[t::nt]:
            n1 = min(N, n0 + nb)
            n, t0, t1 = n1 - n0, n0 * th * tw, n1 * th * tw
            xc, Rc = xp[:n], R[:, :n]

            def pad(lo, hi, xc=xc, n0=n0, n1=n1):
                np.copyto(xc[:, 1 + lo:1 + hi, 1:W + 1], x[n0:n1, lo:hi])
            split_rows(pad, H, n * H * W * C)
            Vc = V[:, t0:t1] if keep else V[t, :, :t1 - t0]
            Vc6 = Vc.reshape(4, 4, n, th, tw, C)
            split_rows(lambda lo, hi, xc=xc, Rc=Rc, Vc6=Vc6: _input_transform(xc, Rc, Vc6, lo, hi, s), th,
                       n * H * W * C)
            Mc = M[:, :t1 - t0]
            np.matmul(Vc, U, out=Mc)  # (16, t, C) @ (16, C, F)
            M6 = Mc.reshape(4, 4, n, th, tw, F)
            Y6 = _tiled(out[n0:n1], th, tw)
            Tc = T[:, :, :n]
            split_rows(lambda lo, hi, M6=M6, Tc=Tc, Y6=Y6: _output_transform(
                M6[..., lo:hi, :, :], Tc[..., lo:hi, :, :], Y6[..., lo:hi, :, :], s), th, n * H * W * F)
    each_thread(run, nt)
    return out if even else out[:, :H, :W]


def _filter_grad(dY: np.ndarray, V: np.ndarray, dU: np.ndarray, nb: int, ws: Workspace | None) -> None:
    """dU (16, C, F) = sum over the chunks of nb images, in chunk order, of V[chunk]^T @ dM[chunk], dM = A dy A^T of
    the chunk's tiles: made and multiplied while in cache, where a whole-batch dM is written and read back (the 32x32
    layer at batch 64: 67 MB each way). Threads take whole chunks (each_thread); every chunk's product has a slot of
    its own and the slots are added in chunk order: the same bits on any number of threads. nb = N: one chunk, its
    product straight into dU, the adjoint split over the images (split_rows) and the GEMM over BLAS's threads."""
    N, H2, W2, F = dY.shape
    th, tw, C = H2 // 2, W2 // 2, V.shape[2]
    chunks = list(range(0, N, nb))
    parts = dU[None] if len(chunks) == 1 else scratch(ws, "wino.dUparts", (len(chunks), 16, C, F), dY.dtype)
    nt = min(threads(), len(chunks))

    def run(t):
        sfx = f"wino.{t}" if t else "wino"
        dM = scratch(ws, f"{sfx}.dM", (16, nb * th * tw, F), dY.dtype)
        T = scratch(ws, f"{sfx}.dT", (4, 2, nb, th, tw, F), dY.dtype)
        for i in range(t, len(chunks), nt):
            n0, n1 = chunks[i], min(N, chunks[i] + nb)
            n, t0, t1 = n1 - n0, n0 * th * tw, n1 * th * tw
            dMc = dM[:, :t1 - t0]
            dY6, T6, dM6 = _tiled(dY[n0:n1], th, tw), T[:, :, :n], dMc.reshape(4, 4, n, th, tw, F)
            split_rows(lambda a, b: _output_adjoint(dY6[:, :, a:b], T6[:, :, a:b], dM6[:, :, a:b]), n, dMc.size)
            np.matmul(V[:, t0:t1].transpose(0, 2, 1), dMc, out=parts[i])  # (16, C, t) @ (16, t, F)
    each_thread(run, nt)
    if len(chunks) > 1:
        np.copyto(dU, parts[0])
        for p in parts[1:]:
            dU += p


def winograd_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, ws: Workspace | None = None,
                     tag: str = "wino") -> tuple[np.ndarray, WinoCache]:
    """x: (N, H, W, C), w: (3, 3, C, F), b: (F,) | None -> out (N, H, W, F), cache (stride 1, pad 1)."""
    N, H, W, C = x.shape
    if w.shape[:3] != (3, 3, C):
        raise ValueError(f"winograd: w {w.shape} does not fit x {x.shape}")
    th, tw = _tiles(H, W)
    V = scratch(ws, f"{tag}.Vkeep", (16, N * th * tw, C), x.dtype)
    U = filter_transform(w, ws, tag)
    out = _conv(x, U, ws, tag, V)
    if b is not None:
        out += b
    return out, WinoCache(x.shape, V, U, b is not None)


def winograd_backward(dout: np.ndarray, cache: WinoCache, need_dx: bool = True, ws: Workspace | None = None,
                      dw_out: np.ndarray | None = None, db_out: np.ndarray | None = None):
    """dout: (N, H, W, F) -> dx (N, H, W, C) | None, dw (3, 3, C, F), db (F,) | None (see conv.conv2d_backward)."""
    N, H, W, C = cache.x_shape
    F = cache.U.shape[2]
    th, tw = _tiles(H, W)
    db = None
    if cache.has_bias:
        db = colsum(dout.reshape(-1, F))
        if db_out is not None:
            db_out[...] = db
            db = db_out
    if H != 2 * th or W != 2 * tw:  # odd sizes: zero the cropped outputs' gradient
        dpad = scratch(ws, "wino.dpad", (N, 2 * th, 2 * tw, F), dout.dtype, zero_new=True)
        dpad[:, :H, :W] = dout
        dY = dpad
    else:
        dY = dout
    dU = scratch(ws, "wino.dU", (16, C, F), dout.dtype)
    nb = _chunk(N, th, tw, C, F)
    if 2 * -(-N // nb) * C > N * th * tw:  # the chunks' partial dU would move over half a whole-batch dM's memory
        nb = N
    _filter_grad(dY, cache.V, dU, nb, ws)
    dw = filter_adjoint(dU, dw_out, ws)
    if not need_dx:
        return None, dw, db
    dx = _conv(dout, cache.U.transpose(0, 2, 1), ws, "winoT", s=SWAP)  # the flipped kernel's U, in SWAP order
    return dx, dw, db
