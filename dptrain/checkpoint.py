"""Checkpoints: one `.npz` of plain arrays, written atomically, read with allow_pickle=False.

Arrays: `params`, `velocity`, `buffers` (the three flat buffers), `ema_params` when train.ema_epochs averages the
weights (the model that was evaluated; ema.py) and `meta`, a UTF-8 JSON document stored as uint8
(config, class names, step, epoch, step-in-epoch, best accuracy, early-stopping counters, dataset fingerprint). The
sampler and augmentation are pure functions of (seed, epoch, index), so (epoch, step-in-epoch) is the whole RNG state.
Write = temp file in the same folder, fsync, rename, fsync the folder: a crash leaves the old file or the new one.
"""
from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from .fsutil import atomic_write

FORMAT_VERSION = 1


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder...): the message names the file, and for
    a full disk the bytes it needs and those free; the previous checkpoint of that name is intact."""

    def __str__(self) -> str:
        return str(self.strerror)  # the whole message, without OSError's "[Errno N]" prefix


def size_of(params: np.ndarray, velocity: np.ndarray, buffers: np.ndarray, meta_bytes: int = 65536,
            ema_params: np.ndarray | None = None) -> int:
    """About how many bytes a checkpoint of these arrays takes (npz: uncompressed, plus headers)."""
    extra = 0 if ema_params is None else ema_params.nbytes + 4096
    return params.nbytes + velocity.nbytes + buffers.nbytes + meta_bytes + 4 * 4096 + extra


def save(path: str | Path, *, params: np.ndarray, velocity: np.ndarray, buffers: np.ndarray, meta: dict,
         ema_params: np.ndarray | None = None) -> None:
    path = Path(path)
    meta = dict(meta, format_version=FORMAT_VERSION)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"params": params, "velocity": velocity, "buffers": buffers, "meta": blob}
        if ema_params is not None:
            arrays["ema_params"] = ema_params
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        need = size_of(params, velocity, buffers, blob.nbytes, ema_params)
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        space = f": it needs about {need:,} bytes, {free:,} are free" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise CheckpointWriteError(e.errno, f"{path}: cannot write the checkpoint ({e.strerror or e}){space}; the "
                                            f"previous {path.name}, if any, is intact") from None


class CheckpointError(ValueError):
    pass


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Return ({params, velocity, buffers[, ema_params]}, meta). Errors name the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("params", "velocity", "buffers")}
            if "ema_params" in z:
                arrays["ema_params"] = z["ema_params"]
            meta = json.loads(z["meta"].tobytes().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    # A truncated or bit-flipped file surfaces as BadZipFile (bad CRC, no central directory) or EOFError (empty),
    # neither of which is a ValueError/OSError.
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a dptrain checkpoint ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return arrays, meta
