"""dptrain.distributed.protocol: round trips compare against the arrays and fields that went in (bit for bit);
the rules are checked one by one; hypothesis fuzzes decode with random and mutated frames and asserts it
only ever raises ProtocolError, with a specific reason (never the catch-all); and a real pyzmq
ROUTER/DEALER pair on 127.0.0.1 carries a 40 MB float32 array zero-copy both ways."""
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from dptrain.distributed.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    Kind,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
)

RUN = "run-42"

# One valid example per kind: (fields, arrays).
STEP_FIELDS = dict(phase="train", epoch=1, attempt=0, weights_version=7, weights_slot=-1, global_count=64,
                   eval_batch=0, shard_sizes=[16])
RESULT_FIELDS = dict(phase="train", attempt=0, count=16, loss_sum=11.5, correct=9, grad_in="frame", grad_scale=1.0,
                     timings={"forward": [0.0, 0.1]})
EXAMPLES = {
    Kind.HELLO: (dict(role="worker", host="node-a", pid=4711, slots=1, versions={"numpy": "2.4"}, code_hash="ab12"),
                 {}),
    Kind.WELCOME: (dict(world_size=4, rank_base=0, config={"bn": "stats", "batch": 64}, shm={"weights": "dpt_w"},
                        num_classes=5), {"labels": np.arange(5, dtype=np.int64)}),
    Kind.READY: ({}, {}),
    Kind.STEP: (STEP_FIELDS, {"indices": np.arange(16, dtype=np.int64), "params": np.ones(10, np.float32)}),
    Kind.RESULT: (RESULT_FIELDS,
                  {"grad": np.linspace(0, 1, 33, dtype=np.float32), "bn_moments": np.ones((3, 8))}),
    Kind.BN_REDUCE: (dict(layer=2, phase="fwd", attempt=0), {"moments": np.ones((3, 8), np.float64)}),
    Kind.BN_REDUCED: (dict(layer=2, phase="bwd", attempt=0), {"moments": np.ones((2, 8), np.float64)}),
    Kind.REDUCE: (dict(attempt=0, lo=0, hi=65536, ranks=[0, 1, 2]), {}),
    Kind.REDUCED: (dict(attempt=0), {"squares": np.ones(1, np.float64)}),
    Kind.UPDATE: (dict(attempt=0, lo=0, hi=65536, lr=0.05, scale=1.0, src=1), {}),
    Kind.UPDATED: (dict(attempt=0), {}),
    Kind.MESH: (dict(attempt=0, mesh_id=1, hosts=[[0, "tcp://10.0.0.2:4000", "k" * 40, 0, 65536, "a"]]),
                {"params": np.ones(8, np.float32), "buffers": np.ones(2, np.float32),
                 "velocity": np.ones(4, np.float32)}),
    Kind.MESHED: (dict(attempt=0, mesh_id=1), {}),
    Kind.SCATTER: (dict(attempt=0, mesh_id=1, src=0, lo=0, hi=4, scale=0.5), {"grad": np.ones(4, np.float16)}),
    Kind.GATHER: (dict(attempt=0, mesh_id=1, src=0, lo=0, hi=4, scale=1.0), {"params": np.ones(4, np.float32)}),
    Kind.BUCKET: (dict(attempt=0, ready_from=1024), {}),
    Kind.SYNC: (dict(attempt=0), {}),
    Kind.SYNCED: (dict(attempt=0, lo=0, hi=4, params_crc=123), {"params": np.ones(4, np.float32),
                                                              "velocity": np.ones(4, np.float32)}),
    Kind.FACTORS: (dict(attempt=0, mesh_id=1, src=2, lo=64, hi=96), {"x": np.ones((3, 2), np.float32),
                                                                     "dy": np.ones((3, 16), np.float32)}),
    Kind.HEARTBEAT: ({}, {}),
    Kind.STOP: (dict(reason="done"), {}),
    Kind.ERROR: (dict(message="boom", traceback="Traceback...\nValueError: boom"), {}),
}


def valid_frames(kind=Kind.RESULT, **kw):
    fields, arrays = EXAMPLES[kind]
    return encode(kind, RUN, step=3, rank=1, arrays=arrays, **{**fields, **kw})


def reason(frames, run=RUN, limits=DEFAULT_LIMITS):
    with pytest.raises(ProtocolError) as e:
        decode(frames, run=run, limits=limits)
    return str(e.value)


def repack(frames, **changes):
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    for k in [k for k, v in changes.items() if v is DELETE]:
        del header[k]
    return [msgpack.packb(header), *frames[1:]]


DELETE = object()


# --- round trips ---------------------------------------------------------------------------------

def test_kinds_are_stable_wire_bytes():
    # 2: typed STEP/RESULT fields, no PREFLIGHT/LOG; 3: REDUCE/UPDATE by workers; 4: the mesh plane across hosts;
    # 5: FACTORS (the mesh's factored Linear)
    assert PROTOCOL_VERSION == 5
    assert [k.value for k in Kind] == list(range(1, 23))


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    fields, arrays = EXAMPLES[kind]
    msg = decode(encode(kind, RUN, step=3, rank=1, arrays=arrays, **fields), run=RUN, limits=Limits())
    assert isinstance(msg, Message)
    assert (msg.kind, msg.run, msg.step, msg.rank) == (kind, RUN, 3, 1)
    assert msg.fields == fields
    assert msg.arrays.keys() == arrays.keys()
    for name, a in arrays.items():
        assert msg.arrays[name].dtype == a.dtype and msg.arrays[name].shape == a.shape
        np.testing.assert_array_equal(msg.arrays[name], a)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (2, 3, 4)])
def test_dtypes_and_shapes_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    out = decode(encode(Kind.HEARTBEAT, RUN, arrays={"a": a}), run=RUN).arrays["a"]
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_encode_is_zero_copy_and_decode_is_zero_copy():
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    frames = encode(Kind.HEARTBEAT, RUN, arrays={"a": a})
    assert np.shares_memory(np.asarray(frames[1]), a)
    received = [bytearray(frames[0]), bytearray(frames[1])]
    out = decode(received, run=RUN).arrays["a"]
    assert np.shares_memory(out, np.frombuffer(received[1], np.uint8))
    assert not out.flags.writeable


def test_non_contiguous_and_big_endian_arrays_are_sent_in_wire_layout():
    a = np.arange(20, dtype=">f8").reshape(4, 5)[:, ::2]
    out = decode(encode(Kind.HEARTBEAT, RUN, arrays={"a": a}), run=RUN).arrays["a"]
    assert out.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(out, a)


def test_numpy_scalars_in_fields_become_plain_values():
    frames = valid_frames(count=np.int64(16), loss_sum=np.float32(2.5), timings={"x": np.float64(0.5)})
    msg = decode(frames, run=RUN)
    assert msg.fields["count"] == 16 and type(msg.fields["count"]) is int
    assert msg.fields["loss_sum"] == 2.5 and msg.fields["timings"] == {"x": 0.5}


def test_result_without_gradient_for_eval_or_shm():
    for grad_in in ("none", "shm"):
        msg = decode(encode(Kind.RESULT, RUN, **{**RESULT_FIELDS, "grad_in": grad_in}), run=RUN)
        assert msg.fields["grad_in"] == grad_in and msg.arrays == {}
    no_grad = encode(Kind.RESULT, RUN, **{**RESULT_FIELDS, "grad_in": "none"})
    assert "grad_in 'slot' is not one of" in reason(repack(no_grad, grad_in="slot"))


def test_hello_run_is_left_to_the_caller_and_run_none_accepts_any():
    fields, _ = EXAMPLES[Kind.HELLO]
    assert decode(encode(Kind.HELLO, "other-run", **fields), run=RUN).run == "other-run"
    assert decode(valid_frames(), run=None).run == RUN


# --- encode refuses what decode would refuse ------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: encode(99, RUN), "unknown kind"),
    (lambda: encode(Kind.HEARTBEAT, RUN, arrays={"b": np.zeros(3, bool)}), "dtype"),
    (lambda: encode(Kind.HEARTBEAT, RUN, arrays={"c": np.zeros(3, np.complex64)}), "dtype"),
    (lambda: encode(Kind.HEARTBEAT, RUN, v=2), "reserved"),
    (lambda: encode(Kind.HEARTBEAT, RUN, step="3"), "step"),
    (lambda: encode(Kind.STOP, RUN), "missing field 'reason'"),
    (lambda: encode(Kind.STEP, RUN, **STEP_FIELDS), "missing array 'indices'"),
    (lambda: encode(Kind.HEARTBEAT, RUN, note=object()), "does not pack"),
])
def test_encode_rejects(call, match):
    with pytest.raises(ProtocolError, match=match):
        call()


# --- decode rules, one by one ---------------------------------------------------------------------

def test_decode_rules():
    f = valid_frames()
    assert "no frames" in reason([])
    assert "no frames" in reason(b"not a list")
    assert "not a buffer" in reason([f[0], 12345, f[2]])
    assert "bad msgpack" in reason([b"\xc1"])
    assert "bad msgpack" in reason([f[0] + b"\x00", *f[1:]])  # trailing bytes
    assert "header is list" in reason([msgpack.packb([1, 2])])
    assert f"protocol version {PROTOCOL_VERSION + 1}" in reason(repack(f, v=PROTOCOL_VERSION + 1))
    assert "protocol version True" in reason(repack(f, v=True))
    assert "unknown kind 77" in reason(repack(f, kind=77))
    assert "lacks 'step'" in reason(repack(f, step=DELETE))
    assert "for run 'other'" in reason(repack(f, run="other"))
    assert "bad step/rank" in reason(repack(f, step="3"))
    assert "bad step/rank" in reason(repack(f, rank=-2))
    assert "'arrays' is dict" in reason(repack(f, arrays={"grad": 1}))
    assert "dtype 'bool'" in reason(repack(f, arrays=[["grad", "bool", [33]], ["bn_moments", "float64", [3, 8]]]))
    assert "listed twice" in reason(repack(f, arrays=[["grad", "float32", [33]], ["grad", "float32", [33]]]))
    assert "bad shape" in reason(repack(f, arrays=[["grad", "float32", [-33]], ["bn_moments", "float64", [3, 8]]]))
    assert "bad shape" in reason(repack(f, arrays=[["grad", "float32", ["33"]], ["bn_moments", "float64", [3, 8]]]))
    assert "3 frames for 1 arrays" in reason(repack(f, arrays=[["grad", "float32", [33]]]))
    assert "frame 1 ('grad' float32[32]) is 132 bytes, expected 128" in reason(
        repack(f, arrays=[["grad", "float32", [32]], ["bn_moments", "float64", [3, 8]]]))
    assert "frame 2" in reason([f[0], f[1], bytes(f[2])[:-1]])  # truncated
    assert "field 'count' is str" in reason(repack(f, count="16"))
    assert "field 'count' is bool" in reason(repack(f, count=True))
    assert "grad_in 'frame' but no 'grad'" in reason(
        [repack(f, arrays=[["bn_moments", "float64", [3, 8]]])[0], f[2]])
    assert "non-string keys" in reason([msgpack.packb({b"v": 1}, use_bin_type=True)])
    assert "bad msgpack" in reason([msgpack.packb({1: 2})])  # strict_map_key refuses int keys outright
    assert "ext type" in reason([msgpack.packb({"v": msgpack.ExtType(5, b"")})])


def test_decode_limits_bound_before_allocating():
    f = valid_frames()
    assert "header is" in reason(f, limits=Limits(max_header_bytes=64))
    huge = repack(f, arrays=[["grad", "float32", [2**40, 2**40]], ["bn_moments", "float64", [3, 8]]])
    assert "bad shape" in reason(huge)
    many = repack(f, arrays=[["grad", "float32", [2**20] * 8], ["bn_moments", "float64", [3, 8]]])
    assert "elements > max" in reason(many)
    assert "frames > max" in reason(f + [b""] * 70)
    assert "3 frames > max 2" in reason(f, limits=Limits(max_arrays=1))
    assert "2 arrays > max 1" in reason(f[:2], limits=Limits(max_arrays=1))
    assert "shape must be a list" in reason(f, limits=Limits(max_ndim=1))
    assert "message is" in reason(f, limits=Limits(max_message_bytes=300))
    long_list = msgpack.packb({"v": 1, "x": list(range(100))})
    assert "bad msgpack" in reason([long_list], limits=Limits(max_container_len=50))


# --- fuzzing --------------------------------------------------------------------------------------

def assert_drops_cleanly(frames, run=RUN):
    """decode either accepts or raises a ProtocolError with a specific reason, never anything else."""
    try:
        decode(frames, run=run, limits=Limits())
    except ProtocolError as e:
        assert "undecodable" not in str(e), f"unhandled path: {e!r} from {e.__cause__!r}"
        assert len(str(e)) < 400, "a reason is one short log line"


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)


def mostly(valid, junk=plain):
    """`valid` nine times in ten, so the fuzz gets past the first checks and reaches the deep ones."""
    return st.integers(0, 9).flatmap(lambda i: valid if i else junk)


dims = mostly(st.integers(0, 6), st.integers(-3, 2**64 - 1) | plain)
descs = st.lists(mostly(st.tuples(st.sampled_from(["grad", "indices", "moments", "a"]),
                                  mostly(st.sampled_from(sorted(DTYPES))),
                                  mostly(st.lists(dims, max_size=3), st.lists(dims, max_size=10) | plain))
                        .map(list)), max_size=4)


@st.composite
def headers_and_frames(draw):
    """A header with each reserved key mostly valid, and frames mostly of the declared sizes."""
    kind = draw(st.sampled_from(list(Kind)))
    fields, _ = EXAMPLES[kind]
    header = {"v": draw(mostly(st.just(1))), "kind": draw(mostly(st.just(int(kind)))),
              "run": draw(mostly(st.just(RUN))), "step": draw(mostly(st.integers(-5, 5))),
              "rank": draw(mostly(st.integers(-2, 4))), "arrays": draw(mostly(descs)),
              **{k: draw(mostly(st.just(v))) for k, v in fields.items()}}
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=2, unique=True)):
        del header[key]
    frames = [msgpack.packb(header)]
    arrays = header.get("arrays")
    for d in arrays if isinstance(arrays, list) else []:
        try:
            n = int(np.prod(d[2])) * np.dtype(d[1]).itemsize
        except Exception:
            n = 8
        n = n if 0 <= n < 10_000 else 8
        frames.append(bytes(draw(mostly(st.just(n), st.integers(0, 64)))))
    extra = draw(st.integers(-1, 1))
    return frames[:extra] if extra < 0 else frames + [b"x"] * extra


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_random_frames(frames):
    assert_drops_cleanly(frames)


@FUZZ
@given(headers_and_frames())
def test_fuzz_structured_headers(frames):
    assert_drops_cleanly(frames)


@FUZZ
@given(st.sampled_from(list(Kind)), st.data())
def test_fuzz_mutated_valid_messages(kind, data):
    fields, arrays = EXAMPLES[kind]
    frames = [bytes(f) for f in encode(kind, RUN, step=1, rank=0, arrays=arrays, **fields)]
    op = data.draw(st.sampled_from(["flip", "truncate", "drop", "append", "field", "junk"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    if op == "flip" and frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        b = bytearray(frames[i])
        b[j] ^= data.draw(st.integers(1, 255))
        frames[i] = bytes(b)
    elif op == "truncate":
        frames[i] = frames[i][:data.draw(st.integers(0, len(frames[i])))]
    elif op == "drop":
        del frames[i]
    elif op == "append":
        frames.append(data.draw(st.binary(max_size=32)))
    elif op == "field":
        header = msgpack.unpackb(frames[0])
        header[data.draw(st.sampled_from(sorted(header)))] = data.draw(plain)
        frames[0] = msgpack.packb(header)
    else:
        frames[i] = data.draw(st.binary(max_size=64))
    assert_drops_cleanly(frames)
    assert_drops_cleanly([memoryview(f) for f in frames], run=None)


# --- a real ROUTER/DEALER pair --------------------------------------------------------------------

def _recv(sock, timeout_ms=10_000):
    assert sock.poll(timeout_ms, zmq.POLLIN), "no message within the timeout"
    return sock.recv_multipart(copy=False)


@pytest.mark.timeout(30)
def test_router_dealer_zero_copy_40mb_round_trip():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")

        fields, _ = EXAMPLES[Kind.HELLO]
        dealer.send_multipart(encode(Kind.HELLO, RUN, rank=0, **fields), copy=False)
        identity, *frames = _recv(router)  # the caller strips ROUTER's identity frame before decode
        hello = decode(frames, run=RUN, limits=Limits())
        assert hello.kind is Kind.HELLO and hello.fields["pid"] == 4711

        weights = np.random.default_rng(1).standard_normal(10_000_000).astype(np.float32)  # 40 MB
        step = encode(Kind.STEP, RUN, step=5, **STEP_FIELDS, arrays={"indices": np.arange(64), "weights": weights})
        router.send_multipart([identity, *step], copy=False)
        frames = _recv(dealer)
        assert isinstance(frames[0], zmq.Frame)
        msg = decode(frames, run=RUN, limits=Limits())
        assert msg.kind is Kind.STEP and msg.step == 5
        np.testing.assert_array_equal(msg.arrays["weights"], weights)
        assert np.shares_memory(msg.arrays["weights"], np.frombuffer(frames[2].buffer, np.uint8))

        # worker -> coordinator, and a small timing printed for the record (not asserted)
        grad = msg.arrays["weights"] * 2
        t0 = time.perf_counter()
        reps = 3
        for k in range(reps):
            dealer.send_multipart(encode(Kind.RESULT, RUN, step=5, rank=0, **RESULT_FIELDS, arrays={"grad": grad}),
                                  copy=False)
            identity, *frames = _recv(router)
            res = decode(frames, run=RUN, limits=Limits())
        dt = (time.perf_counter() - t0) / reps
        np.testing.assert_array_equal(res.arrays["grad"], grad)
        print(f"\n40 MB RESULT encode+send+recv+decode over tcp loopback: {dt * 1e3:.1f} ms "
              f"({grad.nbytes / dt / 1e9:.2f} GB/s)")
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


# --- the module is the truth: its table, its schema and the code agree ------------------------------

def test_docstring_table_lists_the_schema_kinds_and_fields():
    """Every kind of `Kind` has a row in protocol.py's docstring table naming each of its required fields."""
    import dptrain.distributed.protocol as protocol
    doc = protocol.__doc__
    table = doc[doc.index("    kind        direction"):]
    rows = {}
    for line in table.splitlines()[1:]:
        first = line[4:16].strip()
        if first and line.startswith("    "):
            current = rows.setdefault(first, [])
        elif not line.strip():
            break  # the table ends at its first blank line
        current.append(line)
    assert set(rows) == {k.name for k in Kind} == {k.name for k in protocol.SCHEMA}
    for kind, fields in protocol.SCHEMA.items():
        text = " ".join(rows[kind.name])
        for name in fields:
            assert f"{name} " in text, f"{kind.name}: field {name!r} missing from the docstring table"


def test_every_kind_is_sent_and_handled():
    """Scan dptrain/distributed/: each kind appears as the kind of a send/encode call (sent) and in a comparison
    with a received message's kind (handled). A kind nobody sends or nobody reads is dead protocol."""
    import ast
    from pathlib import Path

    import dptrain.distributed as pkg
    sent, handled = set(), set()
    for path in Path(pkg.__file__).parent.glob("*.py"):
        if path.name == "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None) and getattr(node.func, "attr", getattr(node.func, "id", ""))
            if isinstance(node, ast.Call) and name in ("send", "encode", "exchange"):
                # encode(kind, ...), link.send(kind, ...), coordinator.send(peer, kind, ...),
                # coordinator.exchange(kind, reply_kind, ...): the reply kind is what it waits for (handled)
                kinds = [k for k in node.args[:2] if isinstance(k, ast.Attribute)
                         and getattr(k.value, "attr", getattr(k.value, "id", "")) == "Kind"]
                if name == "exchange" and len(kinds) == 2:
                    handled.add(kinds.pop().attr)
                sent.update(k.attr for k in kinds)
            if isinstance(node, ast.Call) and name in ("_collect", "collect"):  # waits for this reply kind
                handled.update(a.attr for a in node.args if isinstance(a, ast.Attribute)
                               and getattr(a.value, "attr", "") == "Kind")
            if isinstance(node, (ast.Compare, ast.Dict)):  # msg.kind is Kind.X; a {Kind.X: handler} table
                for c in ast.walk(node) if isinstance(node, ast.Compare) else node.keys:
                    if isinstance(c, ast.Attribute) and getattr(c.value, "attr", "") == "Kind":
                        handled.add(c.attr)
    kinds = {k.name for k in Kind}
    assert kinds - sent == set(), f"never sent: {kinds - sent}"
    assert kinds - handled == set(), f"never handled: {kinds - handled}"
