"""Find an LFW-style dataset: one sub-folder per class with images inside, as a folder or a tar archive.

    root/Name/Name_0001.jpg           (folder)
    lfw.tgz -> lfw/Name/Name_0001.jpg (archive, or a folder holding lfw/: a single top-level folder with class
                                       folders inside is a wrapper and is stripped, repeatedly)

Entries are named by their path relative to the dataset root (`Name/Name_0001.jpg`) whatever the container, so a
folder and its archive give the same entries. Hidden files and folders (leading '.'), `__MACOSX`, non-image
extensions and images lying directly in the root (no class) are ignored.

The fingerprint identifies the dataset cheaply (no content hashing): SHA-256 over the sorted (relative path, size,
mtime) of every entry, for archives the member's recorded size and mtime. Any added, removed, resized or touched
file changes it, which is what the decode cache keys on.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".webp"})
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
Item = tuple[tuple[str, ...], str, int, int]  # (parts relative to the root, ref, size, mtime)


@dataclass(frozen=True)
class Entry:
    class_name: str  # first path component under the dataset root
    name: str  # path relative to the dataset root, '/'-separated: "Name/Name_0001.jpg"
    ref: str  # where the bytes are: an absolute file path (folder) or the tar member name (archive)
    size: int  # bytes


@dataclass
class Discovered:
    path: Path  # the folder or archive as given
    kind: str  # "dir" or "tar"
    entries: list[Entry]  # sorted by (class_name, name)
    fingerprint: str  # hex SHA-256 of names, sizes, mtimes
    ignored: int  # files seen but not used (non-images, hidden, outside any class folder)
    unsafe: list[str] = field(default_factory=list)  # archive members refused: absolute paths, '..' components
    outside: list[str] = field(default_factory=list)  # images beside the detected layout (not under its wrapper)

    @property
    def class_names(self) -> list[str]:
        return sorted({e.class_name for e in self.entries})


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(name: str, extensions=IMAGE_EXTENSIONS) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


WRAPPER_SHARE = 0.5  # a top folder with class folders inside and more than this share of the images is a wrapper


def _wrapper(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The leading folders to strip: while one top folder holds most of the images (> WRAPPER_SHARE) and some lie
    two levels below it (top/Class/file), that folder is a wrapper (lfw.tgz's `lfw/`), not a class. "Most", not
    "all": a stray member beside it (an odd file at the archive's root, another folder with a handful of files)
    must not turn the whole dataset into one class called `lfw`; what lies outside the wrapper is ignored and
    named."""
    prefix: tuple[str, ...] = ()
    while True:
        d = len(prefix)
        inside = [p for p in paths if p[:d] == prefix and len(p) > d + 1]
        deep = Counter(p[d] for p in inside if len(p) >= d + 3)
        if not deep:
            return prefix
        top = deep.most_common(1)[0][0]
        if sum(1 for p in inside if p[d] == top) <= WRAPPER_SHARE * len(paths):
            return prefix
        prefix += (top,)


def _build(path: Path, kind: str, items: list[Item], seen: int, unsafe: list[str] | None = None) -> Discovered:
    """items: (relative parts, ref, size, mtime) for visible image files; unsafe: member names refused (absolute
    paths, '..')."""
    wrap = _wrapper([p for p, _, _, _ in items])
    entries, keyed, outside = [], [], []
    for parts, ref, size, mtime in items:
        if parts[:len(wrap)] != wrap:  # beside the detected layout
            outside.append("/".join(parts))
            continue
        parts = parts[len(wrap):]
        if len(parts) < 2:  # an image in the root has no class
            continue
        name = "/".join(parts)
        entries.append(Entry(parts[0], name, ref, size))
        keyed.append((name, size, mtime))
    entries.sort(key=lambda e: (e.class_name, e.name))
    h = hashlib.sha256(kind.encode())
    for name, size, mtime in sorted(keyed):
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    found = Discovered(path, kind, entries, h.hexdigest(), seen - len(entries), unsafe or [], outside)
    for what, names in (("members with an absolute path or '..' (never read)", found.unsafe),
                        (f"images outside {'/'.join(wrap) or 'the class folders'}/", found.outside)):
        if names:
            log.warning("%s: ignored %d %s: %s%s", path, len(names), what, ", ".join(names[:5]),
                        f" and {len(names) - 5} more" if len(names) > 5 else "")
    return found


def dir_images(path: Path, extensions=IMAGE_EXTENSIONS) -> tuple[list[Item], int]:
    """(visible files under `path` (recursively) whose extension is in `extensions`, files seen); ref: absolute
    path. Folders are walked in sorted order, files in directory order."""
    items, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel = Path(dirpath).relative_to(path).parts
        for fn in filenames:
            seen += 1
            if fn.startswith(".") or not _is_image(fn, extensions):
                continue
            full = os.path.join(dirpath, fn)
            try:  # stat, never open: a FIFO or device named .jpg is listed here and refused unopened by guard.py
                st = os.stat(full)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # a dangling link: listed, then skipped with its reason when decoded
                size, mtime = 0, 0
            items.append((rel + (fn,), os.path.abspath(full), size, mtime))
    return items, seen


def tar_images(path: Path, extensions=IMAGE_EXTENSIONS) -> tuple[list[Item], int, list[str]]:
    """(visible members of the archive whose extension is in `extensions`, in member order; files seen; members
    refused for an absolute path or a '..' component); ref: the member name. Raises tarfile.TarError / OSError /
    EOFError on an unreadable archive."""
    items, seen, unsafe = [], 0, []
    with tarfile.open(path, "r:*") as tf:
        for m in tf:  # streaming: listing a .tgz reads it once, never holding more than one member
            if not m.isfile():
                continue
            seen += 1
            parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
            if m.name.startswith("/") or ".." in parts:
                unsafe.append(m.name)
                continue
            if not parts or _is_hidden(parts) or not _is_image(parts[-1], extensions):
                continue
            items.append((parts, m.name, m.size, int(m.mtime)))
    return items, seen, unsafe


def discover_dir(path: Path) -> Discovered:
    items, seen = dir_images(path)
    return _build(path, "dir", items, seen)


def discover_tar(path: Path) -> Discovered:
    return _build(path, "tar", *tar_images(path))


def discover(path: str | os.PathLike) -> Discovered:
    """List the images of a dataset folder or archive. Raises FileNotFoundError / ValueError naming the path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p} (expected a folder of class folders or a .tgz/.tar)")
    if p.is_dir():
        found = discover_dir(p)
    elif is_archive(p):
        try:
            found = discover_tar(p)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"cannot read archive {p}: {e}") from e
    else:
        raise ValueError(f"dataset path {p} is neither a folder nor a .tgz/.tar.gz/.tar archive")
    if not found.entries:
        raise ValueError(f"no images found in {p} (expected {p}/ClassName/image.jpg; "
                         f"{found.ignored} other files ignored)")
    log.debug("discovered %d images in %d classes under %s (%d files ignored)",
              len(found.entries), len(found.class_names), p, found.ignored)
    return found
