"""On-disk cache of decoded datasets: `<key>.npy` (uint8 images) + `<key>.json` (names, skipped files, settings).

The key hashes the dataset fingerprint (names, sizes, mtimes; see discover.py) and the preprocessing (image_size,
center_crop, DECODER_VERSION), so any change to the files or the settings misses the cache. Location: the
`cache_dir` argument (DataConfig.cache_dir), else $DPTRAIN_CACHE, else ~/.cache/dptrain.

Writes are atomic: each file goes to a temp file in the same folder, is fsynced, then `os.replace`d into place, the
.npy before the .json. A reader needs the .json and checks that the .npy's shape matches it, so a concurrent
reader sees either no entry or a complete one; two processes that miss at once both decode and both write the
same bytes, which is harmless. Loading never unpickles (allow_pickle=False).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write
from .decode import DECODER_VERSION, DEFAULT_LIMITS, Decoded, decode_entries, warn_skipped
from .discover import Discovered

log = logging.getLogger(__name__)


def resolve_cache_dir(cache_dir: str | os.PathLike = "") -> Path:
    return Path(cache_dir or os.environ.get("DPTRAIN_CACHE") or "~/.cache/dptrain").expanduser()


def cache_key(fingerprint: str, image_size: int, center_crop: int, limits=DEFAULT_LIMITS) -> str:
    text = f"{fingerprint}|size={image_size}|crop={center_crop}|decoder={DECODER_VERSION}|{limits.key()}"
    return "decoded_" + hashlib.sha256(text.encode()).hexdigest()[:24]


def save(cache_dir: Path, key: str, decoded: Decoded, meta: dict) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    npy = cache_dir / f"{key}.npy"
    atomic_write(npy, lambda f: np.save(f, np.ascontiguousarray(decoded.images), allow_pickle=False))
    side = dict(meta, shape=list(decoded.images.shape), names=decoded.names,
                skipped=[list(s) for s in decoded.skipped])
    atomic_write(cache_dir / f"{key}.json", lambda f: f.write(json.dumps(side).encode()))
    return npy


def load(cache_dir: Path, key: str, mmap: bool = False) -> Decoded | None:
    """The cached entry, or None when absent or inconsistent (then it is simply rebuilt)."""
    npy, side = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    try:
        meta = json.loads(side.read_text())
        images = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        if side.exists():
            log.warning("ignoring unreadable decode cache %s: %s", npy, e)
        return None
    if list(images.shape) != meta.get("shape") or images.dtype != np.uint8 or len(meta["names"]) != len(images):
        log.warning("ignoring inconsistent decode cache %s (shape %s, expected %s)", npy, images.shape,
                    meta.get("shape"))
        return None
    return Decoded(images, list(meta["names"]), [tuple(s) for s in meta["skipped"]], from_cache=True)


def decode_cached(found: Discovered, image_size: int, center_crop: int = 0, cache_dir: str | os.PathLike = "", *,
                  workers: int | None = None, progress: bool = True, use_cache: bool = True,
                  limits=DEFAULT_LIMITS) -> Decoded:
    """Decoded images of `found`, from the cache when present, else decoded and written to it. limits (guard.py):
    what is refused; part of the key, since it decides which files are skipped."""
    where = resolve_cache_dir(cache_dir)
    key = cache_key(found.fingerprint, image_size, center_crop, limits)
    decoded = load(where, key) if use_cache else None
    if decoded is None:
        decoded = decode_entries(found, image_size, center_crop, workers=workers, progress=progress, limits=limits)
        if use_cache:
            try:
                save(where, key, decoded, dict(source=str(found.path), fingerprint=found.fingerprint,
                                               image_size=image_size, center_crop=center_crop,
                                               decoder_version=DECODER_VERSION))
            except OSError as e:  # a read-only home must not stop training
                log.warning("could not write decode cache in %s: %s", where, e)
    else:
        log.info("decoded images of %s loaded from cache %s", found.path, where / f"{key}.npy")
    warn_skipped(decoded.skipped, str(found.path))
    return decoded
