"""Decode images to one uint8 (N, S, S, 3) RGB array: Pillow, optional centre crop, resize, parallel.

Per image: open with Pillow, ask JPEGs for a DCT-downscaled draft no smaller than needed (250 px -> 64 px with a
150 px crop decodes at 1/2 scale: less work in the codec, pixels within 1 grey level on average), convert to RGB (first
frame of a GIF, palette/greyscale expanded, alpha dropped; see `to_rgb` for 16-bit greyscale), then one `Image.resize(..., BILINEAR, box=crop)`: the centre crop of `center_crop`
source pixels (clamped to the image; 0 = whole image) is resampled to S x S in one pass. Pillow's BILINEAR widens
its triangle filter by the downscale factor, so downscaling is antialiased (area-like), not point-sampled.
Non-square images without a crop are squashed to a square.

Files that cannot be decoded (empty, truncated, corrupt, not an image) or that the loader refuses to read (guard.py:
FIFOs and devices, files or archive members over data.max_file_mb, images over data.max_image_pixels, formats other
than the supported rasters) are skipped, never fatal and never silent: `decode_entries` returns their names with the
reason, and `warn_skipped` logs one warning naming up to 10.

Parallelism: a process pool over chunks of files when there are many; processes rather than threads because
Pillow releases the GIL only inside the codec and the resampler. Archives are read sequentially in this process (a .tgz has no
random access) and the bytes are shipped to the pool.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from .discover import Discovered
from .guard import DEFAULT_LIMITS, Limits, Refused, check_bytes, check_pixels, open_regular, unsupported

log = logging.getLogger(__name__)

# bump when decoded pixels or the set of decoded files change; part of the cache key (2: 16-bit grey scaled,
# 3: only the supported raster formats, size limits)
DECODER_VERSION = 3
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


def decode_image(src, image_size: int, center_crop: int = 0, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode one image (a path, bytes or file object) to uint8 (S, S, 3). Raises on unreadable data, and Refused
    (guard.py) for what the loader does not read: not a regular file, over a limit, not one of limits.formats."""
    opened = None  # what this function opened, and closes
    if isinstance(src, (bytes, bytearray, memoryview)):
        check_bytes(len(src), limits)
        src = io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)):
        src = opened = open_regular(src, limits)
    with warnings.catch_warnings(), opened or contextlib.nullcontext():
        warnings.simplefilter("ignore")  # palette-transparency and EXIF chatter: not our concern per file
        try:
            im = Image.open(src, formats=limits.formats)  # the header only: nothing is decoded yet
        except UnidentifiedImageError:
            raise unsupported(limits.formats) from None
        with im:
            w0, h0 = im.size
            crop = min(center_crop, w0, h0) if center_crop > 0 else 0
            # Smallest JPEG draft that still has >= image_size pixels across the crop (or the whole image).
            fx = image_size / (crop or w0)
            fy = image_size / (crop or h0)
            im.draft("RGB", (math.ceil(w0 * fx), math.ceil(h0 * fy)))
            check_pixels(*im.size, limits, (w0, h0))  # the size to be decoded (a JPEG draft's), before decoding
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


def _decode_chunk(items: list[tuple[str, object]], image_size: int, center_crop: int,
                  limits: Limits = DEFAULT_LIMITS):
    """Pool task: [(name, path, bytes or a Refused already)] -> (uint8 (k, S, S, 3), ok mask (k,), {name: reason})."""
    out = np.zeros((len(items), image_size, image_size, 3), np.uint8)
    ok = np.zeros(len(items), bool)
    errors = {}
    for j, (name, src) in enumerate(items):
        try:
            if isinstance(src, Refused):  # refused before reading (an archive member over the byte limit)
                raise src
            out[j] = decode_image(src, image_size, center_crop, limits)
            ok[j] = True
        except Refused as e:
            errors[name] = f"refused: {e}"
        except Exception as e:  # any failure of one file skips that file, never the run
            errors[name] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return out, ok, errors


def _iter_chunks(found: Discovered, limits: Limits = DEFAULT_LIMITS):
    """Yield (entry indices, [(name, path, bytes or Refused)]) in chunks of CHUNK files.

    Archives are streamed in member order (a .tgz has no random access), so chunks carry their entry indices; a
    member over the byte limit (its header's size) or not a regular file is never read: a Refused stands for it.
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
            idx.append(i)
            try:
                if not m.isfile():
                    raise Refused("not a regular file member; never read")
                check_bytes(m.size, limits, "member")
                f = tf.extractfile(m)
                items.append((entries[i].name, f.read() if f else b""))
            except Refused as e:
                items.append((entries[i].name, e))
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
                   progress: bool = True, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Decode every entry of `found` (what `limits` refuses is skipped). workers: None = automatic, 1 = here."""
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
        for idx, items in _iter_chunks(found, limits):
            take(idx, _decode_chunk(items, image_size, center_crop, limits))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            inflight = []
            for idx, items in _iter_chunks(found, limits):
                inflight.append((idx, pool.submit(_decode_chunk, items, image_size, center_crop, limits)))
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
    log.warning("skipped %d unreadable or refused image file(s) in %s: %s%s", len(skipped), where, shown, more)
