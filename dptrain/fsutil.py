"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A crash leaves either the old file or the new one, never half of one; readers never see a partial write.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_link(src: str | Path, dst: str | Path) -> None:
    """Make `dst` name the same file as `src` atomically (a hard link under a temp name, renamed over `dst`): no
    second write of a large file. Where hard links are not allowed, an atomic copy."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def atomic_write(path: str | Path, write) -> None:
    """Call `write(f)` on a binary temp file next to `path`, then make it `path` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:  # a rename itself must survive a power cut; not every filesystem lets a folder be fsynced
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
