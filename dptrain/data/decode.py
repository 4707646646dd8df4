"""Decode images to one uint8 (N, S, S, 3) RGB array: Pillow, optional centre crop, resize, parallel.

Per image: open with Pillow, ask JPEGs for a DCT-downscaled draft no smaller than needed (250 px -> 64 px with a
150 px crop decodes at 1/2 scale: less work in the codec, pixels within 1 grey level on average), convert to RGB (first
frame of a GIF, palette/greyscale expanded, alpha dropped; see `to_rgb` for 16-bit greyscale), then one `Image.resize(..., BILINEAR, box=crop)`: the centre crop of `center_crop`
source pixels (clamped to the image; 0 = whole image) is resampled to S x S in one pass. Pillow's BILINEAR widens
its triangle filter by the downscale factor, so downscaling is antialiased (area-like), not point-sampled.
Non-square images without a crop are squashed to a square.

Files that cannot be decoded (empty, truncated, corrupt, not an image) are skipped, never fatal and never silent:
`decode_entries` returns their names with the reason, and `warn_skipped` logs one warning naming up to 10.

Parallelism: a process pool over chunks of files when there are many; processes rather than threads because
Pillow releases the GIL only inside the codec and the resampler. Archives are read sequentially in this process (a .tgz has no
random access) and the bytes are shipped to the pool.
"""
from __future__ import annotations

import io
import logging
import math
import os
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .discover import Discovered

log = logging.getLogger(__name__)

DECODER_VERSION = 2  # bump when decoded pixels change; part of the cache key (2: 16-bit grey scaled)
PARALLEL_MIN_FILES = 400  # below this a pool costs more to start than it saves
CHUNK = 64  # files per pool task


@dataclass
class Decoded:
    images: np.ndarray  # uint8 (M, S, S, 3): the files that decoded, in entry order
    names: list[str]  # M relative names ("Class/file.jpg") matching images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative name, reason) of files not decoded
    from_cache: bool = False  # True when read from the decode cache instead of decoding


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB: Pillow's `convert("RGB")`, except for 16-bit greyscale.

    Pillow opens 16-bit greyscale PNG/TIFF as "I;16" (or "I;16B"...) and 16-bit PGM (any maxval > 255, rescaled to
    65535) as "I", and its convert() clips those values at 255: almost every pixel turns white. Here "I;16*" and "I"
    are read as 0..65535 and scaled by 255/65535 (a pixel v * 257 gives v). An "I" image holding 8-bit values (made
    by `convert("I")`, rare in files) therefore comes out dark: one fixed rule rather than a guess per image.
    "F" (32-bit float TIFF) keeps Pillow's rule: values taken as 0..255, clipped.
    """
    if im.mode == "I" or im.mode.startswith("I;16"):
        grey = np.rint(np.asarray(im, dtype=np.float64) * (255.0 / 65535.0))
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def decode_image(src, image_size: int, center_crop: int = 0) -> np.ndarray:
    """Decode one image (a path, bytes or file object) to uint8 (S, S, 3). Raises on unreadable data."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency and EXIF chatter: not our concern per file
        with Image.open(src) as im:
            w0, h0 = im.size
            crop = min(center_crop, w0, h0) if center_crop > 0 else 0
            # Smallest JPEG draft that still has >= image_size pixels across the crop (or the whole image).
            fx = image_size / (crop or w0)
            fy = image_size / (crop or h0)
            im.draft("RGB", (math.ceil(w0 * fx), math.ceil(h0 * fy)))
            rgb = to_rgb(im)  # forces the decode: truncation/corruption raises here
    w, h = rgb.size
    sx, sy = w / w0, h / h0  # draft scale
    if crop:
        left, top = (w0 - crop) / 2 * sx, (h0 - crop) / 2 * sy
        box = (left, top, left + crop * sx, top + crop * sy)
    else:
        box = (0, 0, w, h)
    out = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def _decode_chunk(items: list[tuple[str, object]], image_size: int, center_crop: int):
    """Pool task: [(name, path or bytes)] -> (uint8 (k, S, S, 3), ok mask (k,), {name: reason})."""
    out = np.zeros((len(items), image_size, image_size, 3), np.uint8)
    ok = np.zeros(len(items), bool)
    errors = {}
    for j, (name, src) in enumerate(items):
        try:
            out[j] = decode_image(src, image_size, center_crop)
            ok[j] = True
        except Exception as e:  # any failure of one file skips that file, never the run
            errors[name] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return out, ok, errors


def _iter_chunks(found: Discovered):
    """Yield (entry indices, [(name, path or bytes)]) in chunks of CHUNK files.

    Archives are streamed in member order (a .tgz has no random access), so chunks carry their entry indices.
    """
    entries = found.entries
    if found.kind == "dir":
        for i in range(0, len(entries), CHUNK):
            idx = list(range(i, min(i + CHUNK, len(entries))))
            yield idx, [(entries[k].name, entries[k].ref) for k in idx]
        return
    position = {e.ref: i for i, e in enumerate(entries)}
    idx, items = [], []
    with tarfile.open(found.path, "r:*") as tf:
        for m in tf:
            i = position.pop(m.name, None)
            if i is None:
                continue
            f = tf.extractfile(m)
            idx.append(i)
            items.append((entries[i].name, f.read() if f else b""))
            if len(idx) == CHUNK:
                yield idx, items
                idx, items = [], []
    for i in position.values():  # listed at discovery but gone now: decodes as an empty file and is skipped
        idx.append(i)
        items.append((entries[i].name, b""))
    if idx:
        yield idx, items


def default_workers(n_files: int) -> int:
    if n_files < PARALLEL_MIN_FILES:
        return 1
    return max(1, min(os.cpu_count() or 1, 16))


def decode_entries(found: Discovered, image_size: int, center_crop: int = 0, *, workers: int | None = None,
                   progress: bool = True) -> Decoded:
    """Decode every entry of `found`. workers: None = automatic, 1 = in this process."""
    from tqdm import tqdm

    n = len(found.entries)
    workers = default_workers(n) if workers is None else max(1, workers)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    errors: dict[str, str] = {}
    bar = tqdm(total=n, desc="decode", unit="img", disable=not progress or n < 200, leave=False)

    def take(idx, result):
        out, k_ok, k_err = result
        images[idx] = out
        ok[idx] = k_ok
        errors.update(k_err)
        bar.update(len(idx))

    if workers == 1:
        for idx, items in _iter_chunks(found):
            take(idx, _decode_chunk(items, image_size, center_crop))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            inflight = []
            for idx, items in _iter_chunks(found):
                inflight.append((idx, pool.submit(_decode_chunk, items, image_size, center_crop)))
                while len(inflight) > 4 * workers:  # bound the bytes held in flight for an archive
                    k, fut = inflight.pop(0)
                    take(k, fut.result())
            for k, fut in inflight:
                take(k, fut.result())
    bar.close()
    names = [e.name for e in found.entries]
    skipped = [(nm, errors.get(nm, "unreadable")) for nm, good in zip(names, ok) if not good]
    if ok.all():
        kept = images
    else:
        kept = images[ok]
    return Decoded(kept, [nm for nm, good in zip(names, ok) if good], skipped)


def warn_skipped(skipped: list[tuple[str, str]], where: str, limit: int = 10) -> None:
    """One warning naming up to `limit` skipped files and the total; nothing when none were skipped."""
    if not skipped:
        return
    shown = "; ".join(f"{nm} ({why})" for nm, why in skipped[:limit])
    more = f"; ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    log.warning("skipped %d unreadable image file(s) in %s: %s%s", len(skipped), where, shown, more)
