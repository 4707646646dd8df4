"""What a peer reports about itself in HELLO, so preflight can refuse a host that runs different code."""
from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import numpy as np

import dptrain

from . import protocol


@functools.cache
def code_hash() -> str:
    """sha256 over every .py file of the installed dptrain package (path + content, sorted): same code, same hash."""
    root = Path(dptrain.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def local_versions() -> dict:
    return {"versions": {"dptrain": dptrain.__version__, "python": platform.python_version(),
                         "numpy": np.__version__, "protocol": protocol.PROTOCOL_VERSION},
            "code_hash": code_hash()}


def mismatches(theirs: dict, ours: dict | None = None) -> list[str]:
    """Human-readable differences between a peer's HELLO fields and ours ([] when they agree)."""
    ours = ours or local_versions()
    out = [f"{k} {theirs.get('versions', {}).get(k)!r} != {v!r}" for k, v in ours["versions"].items()
           if theirs.get("versions", {}).get(k) != v]
    if theirs.get("code_hash") != ours["code_hash"]:
        out.append(f"code hash {theirs.get('code_hash')} != {ours['code_hash']}")
    return out
