"""SharedArray: one copy of the uint8 image array per host, in a named POSIX shared-memory segment.

The creator (one process per host: the launcher or host agent) copies the array in once; every worker attaches by
name and gets a read-only numpy view of the same pages, never a copy.

    with SharedArray.create(images) as cache:        # creator: owns the segment, unlinks it on exit
        spec = cache.spec()                                 # {"name", "shape", "dtype"}: msgpack/JSON-able
        ...send spec to workers...
    cache = SharedArray.attach(spec)                   # worker: read-only view, close() when done
    x = cache.array                                         # np.ndarray, writeable=False

Python 3.11 pitfall (CPython gh-82300, fixed by `track=False` only in 3.13): `SharedMemory(name)` in a process
registers the segment with *that* process's resource_tracker, which unlinks it when the process exits, so a
worker finishing would destroy the creator's segment. (Children started by multiprocessing share the creator's
tracker and escape it; independent interpreters, which is what `dptrain launch` and ssh start, do not.) Attaching therefore never registers: on POSIX it
opens the segment read-only with shm_open + mmap(PROT_READ) (writes fault at the OS level, not just in numpy).
Only the creator's segment is tracked, so if the creator dies its tracker still unlinks it.

Second pitfall: numpy arrays on a buffer keep a reference to the mmap but no buffer export, so closing the mmap
(SharedMemory.close(), also called by its __del__) under a live view makes the next read segfault. So no mapping is
ever closed by hand here: close() drops references and the pages go when the last view does. Names start with `dptrain_` so leaks are easy to
find (`ls /dev/shm/dptrain_*`) and remove.
"""
from __future__ import annotations

import glob
import mmap
import os
import secrets
from multiprocessing import shared_memory

import numpy as np

PREFIX = "dptrain_"


def _open_readonly(name: str, writable: bool = False) -> tuple[mmap.mmap, int]:
    import _posixshmem  # CPython's own shm_open binding, what SharedMemory uses underneath

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot), size
    finally:
        os.close(fd)


class SharedArray:
    """A named shared-memory segment holding one C-contiguous array. Use create() or attach().
    Read-only by default (the image cache); the distributed run also keeps weights, BN buffers and gradient slots
    in writable ones."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype, buf, owner: bool, shm=None,
                 writable: bool = False):
        self.name, self.shape, self.dtype, self.owner = name, tuple(shape), np.dtype(dtype), owner
        self._shm = shm  # the creator's SharedMemory (already closed on POSIX), kept for unlink()
        self._buf = buf  # what holds the mapping
        self.array = np.ndarray(self.shape, self.dtype, buffer=buf)
        self.array.flags.writeable = writable

    @classmethod
    def create(cls, array: np.ndarray | None = None, name: str | None = None, *, shape=None, dtype=None,
               writable: bool = False) -> SharedArray:
        """Copy `array` (or zeros of shape/dtype) into a new segment (name: dptrain_<random> unless given) owned by
        this process. writable=False (the image cache) maps the creator's view read-only too."""
        if array is not None:
            array = np.ascontiguousarray(array)
            shape, dtype = array.shape, array.dtype
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        name = name or PREFIX + secrets.token_hex(6)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
        try:
            if array is not None:  # a new segment is zero-filled by the OS: only copy what was given
                np.ndarray(shape, dtype, buffer=shm.buf)[...] = array
            if os.name != "posix":
                return cls(name, shape, dtype, shm.buf, True, shm, writable)
            # Map it again and close SharedMemory's own mapping: numpy views keep a reference to the
            # mmap object but no buffer export, so SharedMemory.close() (also run by its __del__) would unmap
            # pages under live views and crash. Our mmap is unmapped only when the last view is collected.
            buf, _ = _open_readonly(name, writable)
            shm.close()
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        return cls(name, shape, dtype, buf, True, shm, writable)

    @classmethod
    def attach(cls, spec: dict, writable: bool = False) -> SharedArray:
        """Attach (read-only unless writable) to the segment described by spec() of its creator, without
        registering it."""
        name, shape, dtype = spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if os.name == "posix":
            buf, size = _open_readonly(name, writable)
        else:  # Windows: no resource tracker for shared memory, the segment lives while a handle is open
            handle = shared_memory.SharedMemory(name=name)
            buf, size = handle.buf, handle.size
        if size < nbytes:
            raise ValueError(f"shared memory {name!r} holds {size} bytes, spec {shape} {dtype} needs {nbytes}")
        return cls(name, shape, dtype, buf, False, writable=writable)

    def spec(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.str}

    def close(self) -> None:
        """Drop this object's mapping. It is never unmapped by force: views of `array` still held elsewhere keep
        it valid, and it goes when the last of them is collected."""
        self.array = None
        self._buf = None

    def unlink(self) -> None:
        """Remove the segment's name (creator only); attached processes keep their mapping until they close."""
        if not self.owner:
            raise PermissionError(f"only the creator unlinks shared memory {self.name!r}")
        try:
            self._shm.unlink()  # also unregisters it from this process's resource tracker
        except FileNotFoundError:  # already gone (someone else unlinked it): still stop tracking it
            if os.name == "posix":
                from multiprocessing import resource_tracker

                resource_tracker.unregister(self._shm._name, "shared_memory")
        self.owner = False

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "reader"
        return f"SharedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, {role})"


SharedImageCache = SharedArray  # the name this module was written for: one read-only image cache per host


def segment_name(run_id: str, what: str) -> str:
    """Segments of one run share a prefix, so a leak is easy to name and remove; the creator's pid in the name lets
    `remove_orphans` tell a leak (creator gone, e.g. kill -9 of the whole process group) from a live run."""
    return f"{PREFIX}{run_id}_p{os.getpid()}_{what}"


def remove_orphans() -> list[str]:
    """Unlink this machine's run segments whose creating process no longer exists; returns their names."""
    removed = []
    for name in leftover_segments():
        parts = name[len(PREFIX):].split("_")
        pid = next((int(p[1:]) for p in parts if p[:1] == "p" and p[1:].isdigit()), None)
        if pid is None or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except OSError:
            pass
    return removed


def leftover_segments(run_id: str = "") -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"/dev/shm/{PREFIX}{run_id}*"))
