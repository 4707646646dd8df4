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

Capacity: a segment is sparse until its pages are touched, so on a full tmpfs (a Docker container's /dev/shm is
64 MB) creating it succeeds and the first write past the free space kills the process with SIGBUS. So every
segment's pages are reserved when it is made (posix_fallocate): no room is an error then (`NoSpace`, one line naming
the figures and the fixes), never a SIGBUS later, even when another process fills the filesystem in between; the
launcher also compares the run's whole need with the free space before making the first one (`check_space`).

Directory segments (dist.shm_dir or $DPTRAIN_SHM_DIR, for a larger tmpfs or a local disk): the same segments as
files `DIR/dptrain_*` (mode 0600, created exclusively, never through a symlink), mmap'd shared, with the same names,
reservation and clean-up: the creator unlinks them, and `remove_orphans` removes those whose creator is gone. No
resource tracker watches files, so a launcher killed alone by SIGKILL leaves them until the next launch.
"""
from __future__ import annotations

import errno
import glob
import mmap
import os
import secrets
from multiprocessing import shared_memory

import numpy as np

PREFIX = "dptrain_"
POSIX_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (shm_open)
DIR_ENV = "DPTRAIN_SHM_DIR"  # a folder for the segments instead (a larger tmpfs, a local disk); dist.shm_dir wins


def segment_dir(setting: str = "") -> str:
    """The folder for a run's segments: `setting` (dist.shm_dir), else $DPTRAIN_SHM_DIR, else "" (POSIX shared
    memory, /dev/shm). A folder that does not exist is an error here, before anything is made."""
    where = setting or os.environ.get(DIR_ENV, "")
    if where and not os.path.isdir(where):
        origin = "dist.shm_dir" if setting else f"${DIR_ENV}"
        raise NoSpace(f"{origin} {where!r} is not a directory")
    return os.path.abspath(where) if where else ""


class NoSpace(OSError):
    """The segments do not fit (or their folder is unusable); the message is one line for the user."""


def footprint(nbytes: int) -> int:
    """Bytes a segment of nbytes takes on a tmpfs: whole pages, at least one."""
    page = mmap.PAGESIZE
    return -(-max(1, int(nbytes)) // page) * page


def free_bytes(where: str = "") -> int:
    """Free bytes (for an unprivileged user) of the filesystem holding the segments of `where` ("" = /dev/shm)."""
    st = os.statvfs(where or POSIX_DIR)
    return st.f_bavail * st.f_frsize


def space_message(need: int, free: int, where: str, what: str) -> str:
    """One line: what needs how much ("the run's 8 segments need", "segment NAME needs"), how much is free where,
    and the two fixes."""
    mb = 1 << 20
    shm_size = -(-(need + 64 * mb) // (256 * mb)) * 256  # MB: the need plus headroom, in steps of 256 MB
    return (f"shared memory: {what} {need / mb:,.1f} MB, {where or POSIX_DIR} has {free / mb:,.1f} MB free "
            f"(a Docker container's /dev/shm is 64 MB unless told otherwise): run the container with "
            f"`docker run --shm-size={shm_size}m ...`, or put the segments in a folder on a larger tmpfs or a local "
            f"disk with --dist.shm_dir=DIR (or {DIR_ENV}=DIR)")


def check_space(sizes: dict[str, int], where: str = "") -> int:
    """Raise NoSpace unless segments of these byte sizes fit in `where`'s free space; returns the bytes needed."""
    need = sum(footprint(n) for n in sizes.values())
    free = free_bytes(where)
    if need > free:
        raise NoSpace(space_message(need, free, where, f"the run's {len(sizes)} segments need"))
    return need


def _reserve(fd: int, nbytes: int, where: str, name: str, truncate: bool = False) -> None:
    """Allocate the segment's pages now (after setting its size, with truncate), so that no room is an error here
    and not a SIGBUS at the first write."""
    try:
        if truncate:
            os.ftruncate(fd, max(1, nbytes))
        os.posix_fallocate(fd, 0, max(1, nbytes))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG):
            raise
        raise NoSpace(space_message(footprint(nbytes), free_bytes(where), where, f"segment {name} needs")) from None


def _open_readonly(name: str, writable: bool = False, where: str = "") -> tuple[mmap.mmap, int]:
    flags = os.O_RDWR if writable else os.O_RDONLY
    if where:
        fd = os.open(os.path.join(where, name), flags | os.O_NOFOLLOW)
    else:
        import _posixshmem  # CPython's own shm_open binding, what SharedMemory uses underneath

        fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
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
                 writable: bool = False, where: str = ""):
        self.name, self.shape, self.dtype, self.owner = name, tuple(shape), np.dtype(dtype), owner
        self.where = where  # "" (POSIX shared memory) or the folder holding it as a file
        self._shm = shm  # the creator's SharedMemory (already closed on POSIX), kept for unlink()
        self._buf = buf  # what holds the mapping
        self.array = np.ndarray(self.shape, self.dtype, buffer=buf)
        self.array.flags.writeable = writable

    @classmethod
    def create(cls, array: np.ndarray | None = None, name: str | None = None, *, shape=None, dtype=None,
               writable: bool = False, where: str = "") -> SharedArray:
        """Copy `array` (or zeros of shape/dtype) into a new segment (name: dptrain_<random> unless given) owned by
        this process, its pages reserved (NoSpace when they do not fit). writable=False (the image cache) maps the
        creator's view read-only too. where: a folder to hold it as a file instead of POSIX shared memory."""
        if array is not None:
            array = np.ascontiguousarray(array)
            shape, dtype = array.shape, array.dtype
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        name = name or PREFIX + secrets.token_hex(6)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if where:
            return cls._create_file(array, name, shape, dtype, nbytes, writable, where)
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, nbytes))
        try:
            if os.name == "posix":
                _reserve(shm._fd, nbytes, "", name)
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
    def _create_file(cls, array, name: str, shape, dtype, nbytes: int, writable: bool, where: str) -> SharedArray:
        path = os.path.join(where, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _reserve(fd, nbytes, where, name, truncate=True)
            rw = mmap.mmap(fd, max(1, nbytes), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if array is not None:
                np.ndarray(shape, dtype, buffer=rw)[...] = array
            # read-only for the creator too unless writable; the write mapping goes with its last reference
            buf = rw if writable else mmap.mmap(fd, max(1, nbytes), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, shape, dtype, buf, True, None, writable, where)

    @classmethod
    def attach(cls, spec: dict, writable: bool = False) -> SharedArray:
        """Attach (read-only unless writable) to the segment described by spec() of its creator, without
        registering it."""
        name, shape, dtype = spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"])
        where = spec.get("dir", "")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if os.name == "posix" or where:
            buf, size = _open_readonly(name, writable, where)
        else:  # Windows: no resource tracker for shared memory, the segment lives while a handle is open
            handle = shared_memory.SharedMemory(name=name)
            buf, size = handle.buf, handle.size
        if size < nbytes:
            raise ValueError(f"shared memory {name!r} holds {size} bytes, spec {shape} {dtype} needs {nbytes}")
        return cls(name, shape, dtype, buf, False, writable=writable, where=where)

    def spec(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.str, "dir": self.where}

    def close(self) -> None:
        """Drop this object's mapping. It is never unmapped by force: views of `array` still held elsewhere keep
        it valid, and it goes when the last of them is collected."""
        self.array = None
        self._buf = None

    def unlink(self) -> None:
        """Remove the segment's name (creator only); attached processes keep their mapping until they close."""
        if not self.owner:
            raise PermissionError(f"only the creator unlinks shared memory {self.name!r}")
        if self.where:
            try:
                os.unlink(os.path.join(self.where, self.name))
            except FileNotFoundError:
                pass
            self.owner = False
            return
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


def remove_orphans(where: str = "") -> list[str]:
    """Unlink this machine's run segments (in /dev/shm and in the folder `where`, if any) whose creating process no
    longer exists; returns their names."""
    removed = []
    for folder in dict.fromkeys((POSIX_DIR, where or POSIX_DIR)):
        for name in leftover_segments(where=folder):
            parts = name[len(PREFIX):].split("_")
            pid = next((int(p[1:]) for p in parts if p[:1] == "p" and p[1:].isdigit()), None)
            if pid is None or os.path.exists(f"/proc/{pid}"):
                continue
            path = os.path.join(folder, name)
            try:
                if folder != POSIX_DIR and not os.path.isfile(path):  # ours are plain files: leave anything else
                    continue
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def leftover_segments(run_id: str = "", where: str = "") -> list[str]:
    """Names of the segments (of run_id, or of any run) in /dev/shm, or in the folder `where`."""
    folder = glob.escape(where or POSIX_DIR)
    return sorted(os.path.basename(p) for p in glob.glob(f"{folder}/{PREFIX}{run_id}*"))
