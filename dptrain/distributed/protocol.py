"""dptrain wire protocol: message kinds, encode and decode. No sockets here.

Every message is a list of ZeroMQ frames::

    frame 0      msgpack header: {"v": 1, "kind": int, "run": str, "step": int, "rank": int,
                                  "arrays": [[name, dtype, shape], ...], **kind-specific fields}
    frame 1..n   one raw, C-order, little-endian buffer per entry of "arrays", in that order

`encode()` builds that list with the array frames as zero-copy views, for
``socket.send_multipart(frames, copy=False)``. Do not write to a sent array until
libzmq has released it (send with ``track=True`` and wait on the tracker, or send a
fresh buffer each step); pyzmq copies frames below ``zmq.COPY_THRESHOLD`` anyway.

`decode()` takes what ``recv_multipart(copy=False)`` returns (``zmq.Frame``; bytes,
bytearray and memoryview also work) and returns a `Message` whose arrays are read-only
numpy views over the frame buffers. Every size is bounded by `Limits` *before*
anything is allocated, and any violation raises `ProtocolError(reason)` and nothing
else: the caller logs the reason and drops the message (the coordinator never dies of
a bad message). Never pickle: msgpack holds only plain data, arrays travel as bytes.

ROUTER/DEALER framing: a DEALER sends exactly ``encode(...)``. The coordinator's ROUTER
receives ``[identity, *frames]``; the caller strips the identity before decode and
puts it back in front when replying::

    identity, *frames = router.recv_multipart(copy=False)
    msg = decode(frames, run=run_id, limits=limits)
    router.send_multipart([identity.bytes, *encode(Kind.STEP, run_id, ...)], copy=False)

There is no empty delimiter frame (that is REQ's envelope, and we never use REQ).

Header fields per kind (required; the sender may add others, passed through unchecked).
decode checks each required field's top-level type only (bool never counts as int):
the values of role/phase and what is inside a map or list are the receiver's to check.
The table below and `SCHEMA` list the same kinds and fields (tests/test_protocol.py checks it).

    kind        direction             fields                                          arrays
    HELLO       peer -> coordinator   role str ("worker"|"agent"), host str, pid int, -
                                      slots int, versions map, code_hash str
    WELCOME     coordinator -> peer   world_size int, rank_base int, config map,      labels (int64)
                                      shm map, num_classes int
    READY       peer -> coordinator   - (an agent adds mesh_endpoint str, mesh_key    -
                                      str: where the other agents reach it, and
                                      mesh_factor [w0, K, F] when its workers leave
                                      the factored Linear's factors)
    STEP        coordinator -> peer   phase str ("train"|"eval"), epoch int,          indices (int32|int64);
                                      attempt int, weights_version int,               params + buffers, or
                                      weights_slot int (shared double buffer, or -1),
                                      global_count int (train: the loss's divisor),   update + buffers
                                      eval_batch int (eval: forward batch size),      (float16 wire), or none
                                      shard_sizes list (agents: per-slot split),      (shared memory);
                                      ranks list (one host, sync BN: the round's      buffers alone (mesh)
                                      ranks, whose rows its shared-memory BN sums
                                      wait for; localsum.py)
    RESULT      peer -> coordinator   phase str, attempt int, count int,              grad if grad_in ==
                                      loss_sum float, correct int, grad_in str        "frame"; bn_moments
                                      ("shm"|"frame"|"none"), grad_scale float,       (train)
                                      timings map (phase -> [start, seconds]),        (mesh: squares of
                                      cipher_cpu_s float (mesh agent: its AES-GCM     the agent's slice)
                                      sealing + opening so far, CPU-seconds)
    BN_REDUCE   peer -> coordinator   layer int, phase str ("fwd"|"bwd"), attempt int moments (float64)
                                      (socket transport and agents; one host's shm
                                      workers sum among themselves: localsum.py)
    BN_REDUCED  coordinator -> peer   layer int, phase str, attempt int               moments (float64)
    REDUCE      coordinator -> worker attempt int, lo int, hi int, ranks list: sum   -
                                      [lo, hi) of those ranks' gradient slots in
                                      that order (shared memory)
    REDUCED     worker -> coordinator attempt int                                     squares (float64: Σ g²
                                                                                      per CHUNK block of it)
    UPDATE      coordinator -> worker attempt int, lo int, hi int, lr float,          -
                                      scale float, src int: SGD on [lo, hi) from
                                      buffer src into the other one; ema_rate
                                      float (optional): the weight average's
                                      slice too (ema.blend)
    UPDATED     worker -> coordinator attempt int                                     -
    MESH        coordinator -> agent  attempt int, mesh_id int, hosts list of         params, buffers,
                                      [index, endpoint, key, lo, hi] (slice owners    velocity (the agent's
                                      in host order): join this data plane;           slice) (float32)
                                      bulk_secret bin (optional: dist.bulk_cipher
                                      "aes-gcm", the plane's AEAD secret, bulk.py);   velocity_w (with
                                      replicate [w0, w1] (optional: every host        replicate: that
                                      updates the factored Linear's weights itself)   layer's, float32)
    MESHED      agent -> coordinator  attempt int, mesh_id int                       -
    SCATTER     agent -> agent        attempt int, mesh_id int, src int, lo int,      grad (float32|float16:
                                      hi int, scale float: the sender's local sum     × scale)
                                      over the receiver's slice [lo, hi)
    GATHER      agent -> agent        attempt int, mesh_id int, src int, lo int,      params (float32) or
                                      hi int, scale float: the owner's new weights    update (float16)
                                      over a piece [lo, hi) of its slice
    SYNC        coordinator -> agent  attempt int: your state after this step         -
                                      over ranges list of [lo, hi] (mesh_layout.sync_ranges)
    SYNCED      agent -> coordinator  attempt int, lo int, hi int, params_crc int     params, velocity
                                      (CRC-32 of the agent's whole weights),          (float32, over the
                                      ranges list of [lo, hi] (SYNC's, echoed),       ranges, in order)
                                      velocity_crc int (replicated plane: CRC-32 of
                                      that layer's momentum)
    BUCKET      worker -> agent       attempt int, ready_from int: this rank's        -
                                      gradient slot [ready_from:] is final (mesh:
                                      its host sends it on while backward goes on)
    FACTORS     agent -> agent        attempt int, mesh_id int, src int, lo int,      x, dy (float32): the
                                      hi int: [lo, hi) of the factored Linear's       host's samples' inputs
                                      weight gradient the receiver owns (replicated:  (its rows; replicated:
                                      the whole layer)                                all) and output
                                                                                      gradients
    HEARTBEAT   both ways             -                                               -
    STOP        coordinator -> peer   reason str                                      -
    ERROR       peer -> coordinator   message str, traceback str                      -

`rank` is -1 for the coordinator and for a peer that has no rank yet. HELLO is the one
kind whose `run` is not checked by decode: the caller compares it and answers STOP.
On one host a worker's HELLO and HEARTBEATs also carry `token` str: until a socket has shown
it, the coordinator neither acts on nor answers what it sends (docs/security.md).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 5  # bump on any incompatible change to the header or the kinds


class Kind(enum.IntEnum):
    """Message kinds; the values are what travels in the header's "kind"."""
    HELLO = 1       # peer -> coordinator: who I am (rank, host, pid, slots, versions, code hash)
    WELCOME = 2     # coordinator -> peer: config, world size, first global rank, shared-memory names, labels
    READY = 3       # peer -> coordinator: attached shm, built the model, waiting for STEP
    STEP = 4        # coordinator -> peer: run this phase of step k on this shard, with weights version v
    RESULT = 5      # peer -> coordinator: counts, loss, BN moments, timings; the gradient in shm or a frame
    BN_REDUCE = 6   # peer -> coordinator: one sync-BN layer's local sums (forward moments or backward sums)
    BN_REDUCED = 7  # coordinator -> peers: that layer's sums over every rank, added in rank order
    HEARTBEAT = 8   # both ways: I am alive (about every second)
    STOP = 9        # coordinator -> peer: exit now, with a reason
    ERROR = 10      # peer -> coordinator: I failed, here is the traceback
    REDUCE = 11     # coordinator -> worker: sum your slice of every rank's gradient slot (one host, shared memory)
    REDUCED = 12    # worker -> coordinator: done; the slice's sums of squares for the global norm
    UPDATE = 13     # coordinator -> worker: clip + SGD on your slice, into the other weight buffer
    UPDATED = 14    # worker -> coordinator: done (an agent: with its reduced gradient slice)
    MESH = 15       # coordinator -> agent: the data plane's hosts and slices, and the state to start from
    MESHED = 16     # agent -> coordinator: connected to the other agents, state taken
    SCATTER = 17    # agent -> agent: my local gradient sum over your slice
    GATHER = 18     # agent -> agent: my slice's new weights
    BUCKET = 19     # worker -> its agent: my gradient from this offset to the end is final (backward goes on)
    SYNC = 20       # coordinator -> agent: send me your slice of the state and a checksum of your weights
    SYNCED = 21     # agent -> coordinator: here they are
    FACTORS = 22    # agent -> agent: its workers' inputs and output gradients of the factored Linear, for my rows


# Wire dtypes by name; always little-endian on the wire whatever the host.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code) for name, code in
    [("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"),
     ("int32", "<i4"), ("int64", "<i8"), ("uint8", "u1")]
}

RESERVED = frozenset({"v", "kind", "run", "step", "rank", "arrays"})  # header keys that are not fields

_NUM = (int, float)
# kind -> required field -> accepted Python types (bool is rejected where int/float is asked).
SCHEMA: dict[Kind, dict[str, tuple[type, ...]]] = {
    Kind.HELLO: {"role": (str,), "host": (str,), "pid": (int,), "slots": (int,), "versions": (dict,),
                 "code_hash": (str,)},
    Kind.WELCOME: {"world_size": (int,), "rank_base": (int,), "config": (dict,), "shm": (dict,),
                   "num_classes": (int,)},
    Kind.READY: {},
    Kind.STEP: {"phase": (str,), "epoch": (int,), "attempt": (int,), "weights_version": (int,),
                "weights_slot": (int,), "global_count": (int,), "eval_batch": (int,), "shard_sizes": (list,)},
    Kind.RESULT: {"phase": (str,), "attempt": (int,), "count": (int,), "loss_sum": _NUM, "correct": (int,),
                  "grad_in": (str,), "grad_scale": _NUM, "timings": (dict,)},
    Kind.BN_REDUCE: {"layer": (int,), "phase": (str,), "attempt": (int,)},
    Kind.BN_REDUCED: {"layer": (int,), "phase": (str,), "attempt": (int,)},
    Kind.REDUCE: {"attempt": (int,), "lo": (int,), "hi": (int,), "ranks": (list,)},
    Kind.REDUCED: {"attempt": (int,)},
    Kind.UPDATE: {"attempt": (int,), "lo": (int,), "hi": (int,), "lr": _NUM, "scale": _NUM, "src": (int,)},
    Kind.UPDATED: {"attempt": (int,)},
    Kind.MESH: {"attempt": (int,), "mesh_id": (int,), "hosts": (list,)},
    Kind.MESHED: {"attempt": (int,), "mesh_id": (int,)},
    Kind.SCATTER: {"attempt": (int,), "mesh_id": (int,), "src": (int,), "lo": (int,), "hi": (int,), "scale": _NUM},
    Kind.GATHER: {"attempt": (int,), "mesh_id": (int,), "src": (int,), "lo": (int,), "hi": (int,), "scale": _NUM},
    Kind.BUCKET: {"attempt": (int,), "ready_from": (int,)},
    Kind.SYNC: {"attempt": (int,)},
    Kind.SYNCED: {"attempt": (int,), "lo": (int,), "hi": (int,), "params_crc": (int,)},
    Kind.FACTORS: {"attempt": (int,), "mesh_id": (int,), "src": (int,), "lo": (int,), "hi": (int,)},
    Kind.HEARTBEAT: {},
    Kind.STOP: {"reason": (str,)},
    Kind.ERROR: {"message": (str,), "traceback": (str,)},
}
# kind -> array that must be present -> accepted dtype names
REQUIRED_ARRAYS: dict[Kind, dict[str, tuple[str, ...]]] = {
    Kind.WELCOME: {"labels": ("int64",)},
    Kind.STEP: {"indices": ("int32", "int64")},
    Kind.BN_REDUCE: {"moments": ("float64",)},
    Kind.BN_REDUCED: {"moments": ("float64",)},
    Kind.REDUCED: {"squares": ("float64",)},
    Kind.MESH: {"params": ("float32",), "buffers": ("float32",), "velocity": ("float32",)},
    Kind.SCATTER: {"grad": ("float32", "float16")},
    Kind.SYNCED: {"params": ("float32",), "velocity": ("float32",)},
    Kind.FACTORS: {"x": ("float32",), "dy": ("float32",)},
}
GRAD_IN = ("shm", "frame", "none")  # RESULT's grad_in: in this rank's shared-memory slot, in a frame, no gradient


class ProtocolError(ValueError):
    """A message that must be dropped; str(e) is a short reason fit for one log line."""


@dataclass(frozen=True)
class Limits:
    """Receive-side bounds, checked before any allocation."""
    max_header_bytes: int = 1 << 20        # msgpack header frame (configs, tracebacks, log lines fit)
    max_container_len: int = 1 << 16       # any msgpack list or map in the header
    max_arrays: int = 64                   # array frames per message
    max_ndim: int = 8                      # dimensions per array
    max_array_elements: int = 1 << 28      # per array: 1 GiB of float32; the seed CNN's grad is 9.4 M
    max_message_bytes: int = 1 << 31       # header + all array frames together
    max_name_len: int = 128                # array names and the run id


DEFAULT_LIMITS = Limits()

# what a dropped message costs the log, wherever one is dropped (log.DropLog: the coordinator, a mesh socket)
DROP_LOG_BURST = 50  # dropped-message lines logged per window; the rest are counted: a flood is at most 51 lines a window
DROP_LOG_WINDOW_S = 10.0
DROP_LINE_CHARS = 200  # a dropped message's line is cut here: what a stranger sends never fills the log


def max_frame_bytes(num_params: int, num_buffers: int, bn_moments: int, num_images: int, batch_size: int,
                    factor_shape: tuple[int, int] = (0, 0), limits: Limits = DEFAULT_LIMITS) -> int:
    """The largest frame any message of a run legitimately carries: every socket's ZMQ_MAXMSGSIZE (libzmq checks
    each frame's announced length before it allocates the frame, and drops the connection past it). A frame is the
    header (at most limits.max_header_bytes, which decode enforces anyway) or one array:

        weights, a gradient, an update, a mesh piece, squares  <= num_params elements x 8 bytes (float32, or the
                                                                  exact int64 sums of --batch-invariant)
        the BN buffers                                            num_buffers x 4 (float32)
        BN moments (RESULT, BN_REDUCE, BN_REDUCED)                <= bn_moments x 8 (float64)
        labels (WELCOME), indices (STEP)                          max(num_images, batch_size) x 8 (int64)
        a factored Linear's inputs / output gradients (FACTORS)   batch_size x max(K, F) x 4 (float32)
    """
    return max(limits.max_header_bytes, 8 * num_params, 4 * num_buffers, 8 * bn_moments,
               8 * max(num_images, batch_size), 4 * batch_size * max(factor_shape))


def ceiling_frame_bytes(limits: Limits = DEFAULT_LIMITS) -> int:
    """The largest frame decode could accept at all (an array of max_array_elements int64 or float64): the bound of
    a socket opened before its run's sizes are known (an agent's first link, before WELCOME tells it the run)."""
    return max(limits.max_header_bytes, limits.max_array_elements * 8)


@dataclass
class Message:
    """A decoded message. `arrays` are read-only views over the received frames."""
    kind: Kind
    run: str
    step: int
    rank: int
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _short(x: Any) -> str:
    """repr for a log line: a hostile header must not turn one reason into a megabyte."""
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


short = _short  # for the receivers' log lines about what a peer sent


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _type_ok(x: Any, types: tuple[type, ...]) -> bool:
    return not isinstance(x, bool) and isinstance(x, types)


def _check_schema(kind: Kind, fields: dict[str, Any], names: dict[str, str]) -> None:
    """Required fields and arrays of `kind`; `names` maps array name -> dtype name."""
    for key, types in SCHEMA[kind].items():
        if key not in fields:
            raise ProtocolError(f"{kind.name}: missing field {key!r}")
        if not _type_ok(fields[key], types):
            raise ProtocolError(f"{kind.name}: field {key!r} is {type(fields[key]).__name__}, "
                                f"expected {'/'.join(t.__name__ for t in types)}")
    for name, dtypes in REQUIRED_ARRAYS.get(kind, {}).items():
        if name not in names:
            raise ProtocolError(f"{kind.name}: missing array {name!r}")
        if names[name] not in dtypes:
            raise ProtocolError(f"{kind.name}: array {name!r} is {names[name]}, expected {'/'.join(dtypes)}")
    if kind is Kind.RESULT:
        if fields["grad_in"] not in GRAD_IN:
            raise ProtocolError(f"RESULT: grad_in {_short(fields['grad_in'])} is not one of {GRAD_IN}")
        if fields["grad_in"] == "frame" and "grad" not in names:
            raise ProtocolError("RESULT: grad_in 'frame' but no 'grad' array")


def _plain(x: Any) -> Any:
    """msgpack `default` hook: numpy scalars become Python scalars; anything else is refused."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot put {type(x).__name__} in a header (arrays go in `arrays=`)")


def encode(kind: Kind | int, run: str, step: int = 0, rank: int = -1,
           arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> list[bytes | memoryview]:
    """Frames for ``send_multipart(frames, copy=False)``: header bytes, then one view per array.

    C-contiguous little-endian arrays are sent without a copy; others are copied once
    into that layout. A bad argument (unknown kind, unlisted dtype, missing field)
    raises ProtocolError, so the sender learns what the receiver would have refused.
    """
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown kind {kind!r}") from None
    if not isinstance(run, str) or not _is_int(step) or not _is_int(rank):
        raise ProtocolError("run must be str, step and rank int")
    bad = RESERVED.intersection(fields)
    if bad:
        raise ProtocolError(f"reserved header keys used as fields: {sorted(bad)}")
    fields = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fields.items()}
    descs, frames, names = [], [], {}
    for name, a in (arrays or {}).items():
        a = np.asarray(a)
        if not isinstance(name, str) or a.dtype.name not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {a.dtype} is not one of {sorted(DTYPES)}")
        a = np.asarray(a, dtype=DTYPES[a.dtype.name], order="C")  # no copy when already wire layout
        descs.append([name, a.dtype.name, list(a.shape)])
        names[name] = a.dtype.name
        frames.append(a.reshape(-1).view(np.uint8).data)  # (nbytes,) byte view, shares memory with a
    _check_schema(kind, fields, names)
    header = {"v": PROTOCOL_VERSION, "kind": int(kind), "run": run, "step": step, "rank": rank,
              "arrays": descs, **fields}
    try:
        head = msgpack.packb(header, default=_plain, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"header does not pack: {e}") from None
    return [head, *frames]


def _buffer(frame: Any, i: int) -> memoryview:
    """A flat byte view of one frame without copying it."""
    if isinstance(frame, (bytes, bytearray, memoryview, np.ndarray)):
        buf = memoryview(frame)
    else:
        buf = getattr(frame, "buffer", None)  # zmq.Frame from recv_multipart(copy=False)
        if not isinstance(buf, memoryview):
            raise ProtocolError(f"frame {i} is a {type(frame).__name__}, not a buffer")
    if not buf.c_contiguous:
        raise ProtocolError(f"frame {i} is not contiguous")
    if buf.ndim != 1 or buf.format != "B":
        buf = buf.cast("B")
    return buf


def _array_descs(descs: Any, limits: Limits) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """Validate the header's "arrays" list -> [(name, dtype, shape, nbytes)]."""
    if not isinstance(descs, list):
        raise ProtocolError(f"'arrays' is {type(descs).__name__}, expected list")
    if len(descs) > limits.max_arrays:
        raise ProtocolError(f"{len(descs)} arrays > max {limits.max_arrays}")
    out, seen = [], set()
    for j, d in enumerate(descs):
        if not (isinstance(d, list) and len(d) == 3):
            raise ProtocolError(f"array descriptor {j} is not [name, dtype, shape]")
        name, dtype, shape = d
        if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len:
            raise ProtocolError(f"array descriptor {j}: bad name")
        if name in seen:
            raise ProtocolError(f"array {name!r} listed twice")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {_short(dtype)} not allowed")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise ProtocolError(f"array {name!r}: shape must be a list of at most {limits.max_ndim} ints")
        if not all(_is_int(n) and 0 <= n <= limits.max_array_elements for n in shape):
            raise ProtocolError(f"array {name!r}: bad shape {_short(shape)}")
        count = math.prod(shape)  # exact Python int: each dim is bounded, so no overflow games
        if count > limits.max_array_elements:
            raise ProtocolError(f"array {name!r}: {count} elements > max {limits.max_array_elements}")
        out.append((name, DTYPES[dtype], tuple(shape), count * DTYPES[dtype].itemsize))
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} not allowed")


def decode(frames: Any, *, run: str | None, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check and decode one message (identity frame already stripped); see the module docstring.

    `run`: the expected run id, or None to accept any (a HELLO's run is never checked here).
    Raises ProtocolError, and only ProtocolError, for anything it will not accept.
    """
    try:
        return _decode(frames, run, limits)
    except ProtocolError:
        raise
    except Exception as e:  # belt and braces: a decode bug must still only drop the message
        raise ProtocolError(f"undecodable message ({type(e).__name__})") from e


def _decode(frames: Any, run: str | None, limits: Limits) -> Message:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("no frames")
    if len(frames) > limits.max_arrays + 1:
        raise ProtocolError(f"{len(frames)} frames > max {limits.max_arrays + 1}")
    bufs = [_buffer(f, i) for i, f in enumerate(frames)]  # views only; nothing is read yet
    head = bufs[0]
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header is {len(head)} bytes > max {limits.max_header_bytes}")
    n = limits.max_container_len
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                                 ext_hook=_reject_ext, max_ext_len=0,
                                 max_str_len=limits.max_header_bytes, max_bin_len=limits.max_header_bytes,
                                 max_array_len=n, max_map_len=n)
    except ProtocolError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError...
        raise ProtocolError(f"bad msgpack header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header is {type(header).__name__}, expected map")
    if not all(isinstance(k, str) for k in header):
        raise ProtocolError("header has non-string keys")
    for key in ("v", "kind", "run", "step", "rank", "arrays"):
        if key not in header:
            raise ProtocolError(f"header lacks {key!r}")
    v, kind, msg_run, step, rank = (header[k] for k in ("v", "kind", "run", "step", "rank"))
    if not _is_int(v) or v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_short(v)}, expected {PROTOCOL_VERSION}")
    if not _is_int(kind) or kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown kind {_short(kind)}")
    kind = Kind(kind)
    if not isinstance(msg_run, str) or len(msg_run) > limits.max_name_len:
        raise ProtocolError("bad run id")
    if run is not None and kind is not Kind.HELLO and msg_run != run:
        raise ProtocolError(f"{kind.name} for run {msg_run!r}, expected {run!r}")
    if not _is_int(step) or not _is_int(rank) or rank < -1:
        raise ProtocolError(f"bad step/rank {_short(step)}/{_short(rank)}")
    descs = _array_descs(header["arrays"], limits)
    if len(bufs) != len(descs) + 1:
        raise ProtocolError(f"{len(bufs)} frames for {len(descs)} arrays (expected {len(descs) + 1})")
    total = len(head) + sum(d[3] for d in descs)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes > max {limits.max_message_bytes}")
    arrays = {}
    for i, ((name, dtype, shape, nbytes), buf) in enumerate(zip(descs, bufs[1:]), start=1):
        if len(buf) != nbytes:
            raise ProtocolError(f"frame {i} ({name!r} {dtype.name}{list(shape)}) is {len(buf)} bytes, "
                                f"expected {nbytes}")
        a = np.frombuffer(buf, dtype=dtype) if nbytes else np.empty(0, dtype)
        a = a.reshape(shape)
        a.flags.writeable = False  # a view over a received frame is not scratch space
        arrays[name] = a
    fields = {k: val for k, val in header.items() if k not in RESERVED}
    _check_schema(kind, fields, {name: d.name for name, d, _, _ in descs})
    return Message(kind=kind, run=msg_run, step=step, rank=rank, fields=fields, arrays=arrays)
