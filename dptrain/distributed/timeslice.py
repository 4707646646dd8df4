"""Longer scheduler time slices for workers that outnumber the cores.

With more workers than cores, the kernel's fair scheduler switches between them every few milliseconds (hundreds of
involuntary switches a second), and each switch hands the core to a rank whose activations have left
the caches. Linux 6.12+ (EEVDF) lets a process ask for a longer slice of its own (`sched_setattr`'s sched_runtime,
100 us - 100 ms, no privilege needed): a rank then runs most of its shard in one go and the ranks sharing a core take
turns. The launcher's coordinator keeps the default slice, so a rank woken by a message does not delay it.
Elsewhere (kernels before 6.12 ignore the field, other systems have no such call) nothing is asked."""
from __future__ import annotations

import ctypes
import os
import platform
import struct

ENV = "DPTRAIN_TIMESLICE_MS"  # the launcher tells its workers the slice here (0 or absent: the kernel's default)
MAX_MS = 100  # the kernel's upper bound for a fair task's slice

_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr (SCHED_ATTR_SIZE_VER1, 56 bytes)
_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # (sched_setattr, sched_getattr)


def _syscalls() -> tuple[int, int] | None:
    return _CALLS.get(platform.machine()) if os.name == "posix" and platform.system() == "Linux" else None


def supported() -> bool:
    """Linux 6.12 or later on x86-64 or ARM64: a fair task's requested slice is honoured."""
    if _syscalls() is None:
        return False
    try:
        major, minor = (int(v) for v in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 12)


def get_slice_ns(tid: int = 0) -> int | None:
    """The calling thread's (or tid's) slice in ns (the kernel's default is a few ms), or None where it cannot be
    read."""
    calls = _syscalls()
    if calls is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(calls[1], tid, buf, _ATTR.size, 0) != 0:
        return None
    return _ATTR.unpack(buf.raw)[5]


def set_slice(ms: float, tid: int = 0) -> bool:
    """Ask for time slices of `ms` milliseconds for the calling thread (threads it starts later inherit them).
    Policy, nice and priority are kept. True when the kernel kept the request (read back)."""
    calls = _syscalls()
    if not supported() or ms <= 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(calls[1], tid, buf, _ATTR.size, 0) != 0:
        return False
    _, policy, _, nice, prio, _, _, _, _, _ = _ATTR.unpack(buf.raw)
    ns = int(min(ms, MAX_MS) * 1e6)
    new = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, policy, 0, nice, prio, ns, 0, 0, 0, 0), _ATTR.size)
    if libc.syscall(calls[0], tid, new, 0) != 0:
        return False
    return get_slice_ns(tid) == ns


def apply_from_env() -> str:
    """In a worker, before it starts any thread: the slice the launcher chose (see ENV). Returns what happened, for
    the worker's log ("" when none was asked for)."""
    try:
        ms = float(os.environ.get(ENV, "0") or 0)
    except ValueError:
        return f"ignored {ENV}={os.environ.get(ENV)!r}: not a number"
    if ms <= 0:
        return ""
    if set_slice(ms):
        return f"scheduler time slice {min(ms, MAX_MS):g} ms (dist.timeslice_ms, distributed/timeslice.py)"
    return f"scheduler time slice of {ms:g} ms not available here (Linux 6.12+): the kernel's default"
