"""fsutil: atomic writes and atomic second names (hard links) of files."""
from __future__ import annotations

import os

from dptrain.fsutil import atomic_link, atomic_write


def test_atomic_link_names_the_same_file_and_replaces(tmp_path):
    a, b = tmp_path / "last.npz", tmp_path / "best.npz"
    atomic_write(a, lambda f: f.write(b"one"))
    atomic_write(b, lambda f: f.write(b"old best"))
    atomic_link(a, b)
    assert b.read_bytes() == b"one" and os.stat(a).st_ino == os.stat(b).st_ino
    atomic_write(a, lambda f: f.write(b"two"))  # a new last.npz: best.npz keeps what it named
    assert b.read_bytes() == b"one" and a.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "last.npz"]  # no temp file left


def test_atomic_link_copies_where_links_fail(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    atomic_write(a, lambda f: f.write(b"x" * 3_000_000))

    def no_links(*args, **kwargs):
        raise PermissionError("no hard links here")
    monkeypatch.setattr(os, "link", no_links)
    atomic_link(a, b)
    assert b.read_bytes() == a.read_bytes() and os.stat(a).st_ino != os.stat(b).st_ino
