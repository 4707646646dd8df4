"""Sealed bulk frames (dist.bulk_cipher = "aes-gcm", distributed/bulk.py): the framing alone, then two real mesh
sockets over loopback TCP with an intruder beside them. The whole runs (mesh, intruders on a cluster, replay
bitwise) are in test_mesh.py, test_multihost.py and test_replay.py with --dist.bulk_cipher=aes-gcm."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

from dptrain.distributed import protocol as P
from dptrain.distributed.bulk import (
    ENVELOPE,
    NONCE,
    TAG,
    BulkError,
    Opener,
    OtherPlane,
    Sealer,
    link_key,
    plane_secret,
)

RUN = "bulkrun"


def frames(step=3, lo=0, values=None, kind=P.Kind.SCATTER):
    grad = np.arange(1000, dtype=np.float32) if values is None else values
    return P.encode(kind, RUN, step=step, rank=0, arrays={"grad": grad}, attempt=0, mesh_id=1, src=0, lo=lo,
                    hi=lo + grad.size, scale=1.0)


def pair(secret=None, plane=1):
    secret = secret or plane_secret()
    return Sealer(secret, RUN, plane, 0, 1), Opener(secret, RUN, plane, 1, [0, 2])


def decoded(opened):
    sender, fr = opened
    return sender, P.decode(fr, run=RUN)


def test_sealed_message_opens_to_the_same_message_and_hides_its_contents():
    s, o = pair()
    values = np.full(1000, 1234.5, np.float32)
    plain = frames(values=values)
    sealed = s.seal(plain)
    assert len(sealed) == 3 and len(sealed[0]) == ENVELOPE.size
    assert [len(x) for x in sealed[1:]] == [len(bytes(plain[0])) + TAG, values.nbytes + TAG]
    assert bytes(plain[0]) not in b"".join(sealed) and values.tobytes()[:16] not in b"".join(sealed)
    sender, msg = decoded(o.open(sealed))
    assert sender == 0 and msg.kind is P.Kind.SCATTER and msg.step == 3
    assert np.array_equal(msg.arrays["grad"], values)


@pytest.mark.parametrize("frame", [1, 2])
def test_one_flipped_bit_anywhere_refuses_the_message(frame):
    s, o = pair()
    sealed = s.seal(frames())
    for pos in (0, len(sealed[frame]) // 2, len(sealed[frame]) - 1):  # ciphertext's start, middle, tag's end
        bad = [bytearray(x) for x in sealed]
        bad[frame][pos] ^= 1
        with pytest.raises(BulkError, match="failed authentication"):
            o.open(bad)
    sender, msg = decoded(o.open(sealed))  # a forgery moved nothing: the genuine message still opens
    assert sender == 0


def test_envelope_is_bound_to_its_frames():
    """The envelope is associated data: another counter, sender or receiver in it refuses the message (or names a
    link this host does not have)."""
    s, o = pair()
    sealed = s.seal(frames())
    magic, plane, sender, receiver, c0 = ENVELOPE.unpack(sealed[0])
    for env, why in ((ENVELOPE.pack(magic, plane, sender, receiver, c0 + 5), "failed authentication"),
                     (ENVELOPE.pack(magic, plane, 2, receiver, c0), "failed authentication"),
                     (ENVELOPE.pack(magic, plane, sender, 2, c0), "not a link of this host"),
                     (ENVELOPE.pack(b"XXXX", plane, sender, receiver, c0), "magic"),
                     (sealed[0][:-1], "envelope of")):
        with pytest.raises(BulkError, match=why):
            o.open([env, *sealed[1:]])
    with pytest.raises(OtherPlane):
        o.open([ENVELOPE.pack(magic, plane + 1, sender, receiver, c0), *sealed[1:]])


def test_array_cannot_be_moved_into_another_message():
    """Wrong associated data: step 4's array spliced under step 5's header (same link, its own counter), or one
    piece's array under another piece's header, is refused."""
    s, o = pair()
    a, b = s.seal(frames(step=4)), s.seal(frames(step=5))
    with pytest.raises(BulkError, match="failed authentication"):
        o.open([b[0], b[1], a[2]])
    c, d = s.seal(frames(lo=0)), s.seal(frames(lo=1000))
    with pytest.raises(BulkError, match="failed authentication"):
        o.open([d[0], d[1], c[2]])
    for m in (a, b, c, d):  # all genuine, in order: accepted
        o.open(m)


def test_replayed_message_is_refused_even_within_its_step():
    s, o = pair()
    first, second = s.seal(frames(step=3)), s.seal(frames(step=4))
    o.open(first)
    with pytest.raises(BulkError, match="already used"):
        o.open(first)  # the same message again
    o.open(second)
    with pytest.raises(BulkError, match="already used"):
        o.open(first)  # an earlier step's, after a later one


def test_other_link_plane_or_run_keys_do_not_open():
    secret = plane_secret()
    sealed = Sealer(secret, RUN, 1, 2, 1).seal(frames())  # host 2 -> 1: a genuine link, other key
    assert decoded(Opener(secret, RUN, 1, 1, [0, 2]).open(sealed))[0] == 2
    # the same bytes presented as host 0's (the envelope rewritten): other key, other nonce
    magic, plane, _, receiver, c0 = ENVELOPE.unpack(sealed[0])
    with pytest.raises(BulkError, match="failed authentication"):
        Opener(secret, RUN, 1, 1, [0, 2]).open([ENVELOPE.pack(magic, plane, 0, receiver, c0), *sealed[1:]])
    with pytest.raises(BulkError, match="failed authentication"):
        Opener(secret, "otherrun", 1, 1, [0, 2]).open(sealed)
    with pytest.raises(BulkError, match="failed authentication"):
        Opener(plane_secret(), RUN, 1, 1, [0, 2]).open(sealed)
    keys = {link_key(secret, RUN, p, i, j) for p in (1, 2) for i in range(4) for j in range(4) if i != j}
    assert len(keys) == 2 * 4 * 3  # one key per direction per plane


def test_nonces_never_repeat_under_a_key():
    """Every frame sealed under one key gets a nonce of its own: the counter runs on across messages, whatever
    their frame counts, and the sender and receiver are in the nonce too."""
    s = Sealer(plane_secret(), RUN, 1, 0, 1)
    used = []

    class Spy:
        def __init__(self, aead):
            self.aead = aead

        def encrypt(self, nonce, data, ad):
            used.append(nonce)
            return self.aead.encrypt(nonce, data, ad)
    s.aead = Spy(s.aead)
    for n_arrays in (0, 1, 3, 1, 2):
        arrays = {f"a{i}": np.zeros(4, np.float32) for i in range(n_arrays)}
        s.seal(P.encode(P.Kind.HEARTBEAT, RUN, arrays=arrays))
    assert len(used) == 5 + 7 and len(set(used)) == len(used)
    assert all(NONCE.unpack(n)[:2] == (0, 1) for n in used)
    assert [NONCE.unpack(n)[2] for n in used] == list(range(len(used)))


# ---- two real mesh sockets over loopback --------------------------------------------------------------------------
def _links(ctx, cipher="aes-gcm", threads=1):
    from dptrain.distributed.mesh import MeshLink
    keys = {"client_public": "x" * 40, "client_secret": "y" * 40}  # sealed sockets never use them as CURVE keys
    links = [MeshLink(ctx, "127.0.0.1", keys, RUN, i, f"h{i}", 1 << 20, cipher, threads) for i in range(2)]
    return links


def _drain_until(link, n, timeout=5.0):
    end = time.monotonic() + timeout
    while len(link.early) + link.dropped < n and time.monotonic() < end:
        if link.sock.poll(50):
            link._drain()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("threads", [1, 3])  # 3: sealed and opened on a pool (dist.cipher_threads), in order
def test_sealed_mesh_link_delivers_and_an_intruder_changes_nothing(threads):
    """Host 0 sends host 1 two pieces over a socket without CURVE; an intruder on the same socket sends an unsealed
    message, a forged one and a recorded genuine one played again: only the two genuine pieces are kept, the three
    others are counted as dropped, and the intruder gets nothing back."""
    ctx = zmq.Context()
    links = _links(ctx, threads=threads)
    try:
        assert all(link.sealed and link.key == "" for link in links)
        secret = os.urandom(32)
        hosts = [[i, link.endpoint, link.key, 0, 1000, f"h{i}"] for i, link in enumerate(links)]
        for link in links:
            link.configure(hosts, 1, secret)
        recorded = []
        seal = links[0].sealers[1].seal_reserved
        links[0].sealers[1].seal_reserved = lambda c0, fr: recorded.append(seal(c0, fr)[0]) or (recorded[-1], 0.0)
        grad = np.linspace(-1, 1, 1000, dtype=np.float32)
        links[0].send(1, P.Kind.SCATTER, 7, 0, {"grad": grad}, lo=0, hi=1000, scale=1.0)
        links[0].flush()
        _drain_until(links[1], 1)
        evil = ctx.socket(zmq.DEALER)
        evil.setsockopt(zmq.LINGER, 0)
        evil.connect(links[1].endpoint)
        evil.send_multipart(frames(step=7))  # unsealed
        forged = [bytearray(x) for x in recorded[0]]
        forged[2][10] ^= 0x80
        evil.send_multipart(forged)
        evil.send_multipart(recorded[0])  # played again
        _drain_until(links[1], 4)
        links[0].send(1, P.Kind.SCATTER, 8, 0, {"grad": grad * 2}, lo=0, hi=1000, scale=1.0)
        links[0].flush()
        _drain_until(links[1], 5)
        assert links[1].dropped == 3
        assert [(m.step, m.rank) for m in links[1].early] == [(7, 0), (8, 0)]
        assert np.array_equal(links[1].early[0].arrays["grad"], grad)
        assert np.array_equal(links[1].early[1].arrays["grad"], grad * 2)
        assert not evil.poll(200)
        evil.close(0)
    finally:
        for link in links:
            link.close()
        ctx.term()


def test_curve_setting_keeps_curve_on_the_mesh_socket():
    ctx = zmq.Context()
    from dptrain.distributed.curve import RunKeys
    from dptrain.distributed.mesh import MeshLink
    k = RunKeys.generate().for_agents()
    link = MeshLink(ctx, "127.0.0.1", k, RUN, 0, "h0", 1 << 20, "curve")
    try:
        assert not link.sealed and len(link.key) == 40 and link.sock.curve_server
    finally:
        link.close()
        ctx.term()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("threads", [1, 3])
def test_a_burst_arrives_whole_and_in_order_and_a_copy_cannot_overtake_it(threads):
    """40 pieces (sealed side by side with dist.cipher_threads 3) are sent in their order (the receiver's window only
    moves up) and opened in one drain (side by side with 3); a recorded genuine message played again over another
    connection inside the same drain is refused: the ROUTER interleaves connections, and were the copy taken first,
    its counter would make the sender's genuine earlier messages look replayed (each sender is bound to the
    connection its first authentic message came over)."""
    ctx = zmq.Context()
    links = _links(ctx, threads=threads)
    try:
        hosts = [[i, link.endpoint, link.key, 0, 1000, f"h{i}"] for i, link in enumerate(links)]
        secret = os.urandom(32)
        for link in links:
            link.configure(hosts, 1, secret)
        recorded = {}
        seal = links[0].sealers[1].seal_reserved

        def keep(c0, fr):  # runs on the pool's threads
            recorded[c0] = seal(c0, fr)[0]
            return recorded[c0], 0.0
        links[0].sealers[1].seal_reserved = keep
        pieces = [np.full(4096, k, np.float32) for k in range(40)]
        for k, p in enumerate(pieces):
            links[0].send(1, P.Kind.SCATTER, 3, 0, {"grad": p}, lo=k, hi=k + 1, scale=1.0)
        links[0].flush()
        evil = ctx.socket(zmq.DEALER)
        evil.setsockopt(zmq.LINGER, 0)
        evil.connect(links[1].endpoint)
        time.sleep(0.3)  # the 40 are queued at host 1 before the copy
        evil.send_multipart(recorded[10])  # the sixth message (counters 10, 11)
        time.sleep(0.3)
        _drain_until(links[1], 41)
        assert links[1].dropped == 1
        assert [m.fields["lo"] for m in links[1].early] == list(range(40))
        assert all(np.array_equal(m.arrays["grad"], pieces[k]) for k, m in enumerate(links[1].early))
        assert links[0].cipher_cpu_s >= 0 and links[1].cipher_cpu_s > 0
        evil.close(0)
    finally:
        for link in links:
            link.close()
        ctx.term()
