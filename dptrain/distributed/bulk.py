"""Sealed bulk frames between hosts: AES-256-GCM with keys agreed over the CURVE channel (dist.bulk_cipher = "aes-gcm").

The mesh's host-to-host sockets carry only SCATTER, GATHER and FACTORS (the gradients, weights and factors: the
bytes of a step). With "aes-gcm" those sockets drop CURVE and every message on them is sealed here instead; the
coordinator's link, which carries the control messages and the keys, keeps CURVE. docs/security.md has the design
and the reasons; in short:

* keys: the coordinator makes a 256-bit plane secret from os.urandom for every plane it forms (every run start,
  every re-formed plane) and sends it in the MESH message over its CURVE link; each direction i -> j of each link
  has its own AES-256 key, HKDF-SHA256(secret, info = "dptrain bulk v1", run, plane, i, j);
* nonces: 96 bits = sender (16) | receiver (16) | counter (64). The counter belongs to one direction of one plane,
  starts at 0 and goes up by one per frame, so no nonce repeats under a key (a key is never used by another
  direction or plane, and the sender and receiver are in the nonce as well);
* a message travels as [envelope, sealed header, sealed arrays...]. The envelope (plain, 20 bytes: magic, plane,
  sender, receiver, first counter) is the associated data of the header; the envelope and the header's plaintext
  (run, step, attempt, kind, sender, slice bounds, scale, each array's name, dtype and shape) are the associated
  data of every array, so an array cannot be moved into another message, step, piece or link;
* a receiver takes from a sender only counters above the last it accepted (one TCP connection per direction keeps
  them in order), so a recorded message played again is refused even within its step;
* anything that fails (short envelope, another plane, a wrong receiver, an old counter, a tag that does not verify)
  raises BulkError: the caller drops the message and counts it, as a malformed one. Nothing of it is used.
"""
from __future__ import annotations

import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CIPHERS = ("curve", "aes-gcm")
MAGIC = b"DPB1"
ENVELOPE = struct.Struct(">4sIHHQ")  # magic, plane (mesh_id), sender, receiver, first frame's counter
NONCE = struct.Struct(">HHQ")  # sender, receiver, counter: 12 bytes, GCM's native nonce size
TAG = 16  # bytes a sealed frame is longer than its plaintext
SECRET_BYTES = 32
INFO = b"dptrain bulk v1\0"


class BulkError(Exception):
    """A sealed message that is not accepted (why, in one line)."""


class OtherPlane(BulkError):
    """Sealed for another plane than this host's: one still in flight when the plane was re-formed (dropped without
    a word, as an unsealed message of an old plane is), or a forgery (dropped all the same)."""


def plane_secret() -> bytes:
    """A fresh secret for one plane of one run start (the coordinator's; sent over its CURVE link only)."""
    return os.urandom(SECRET_BYTES)


def link_key(secret: bytes, run: str, plane: int, sender: int, receiver: int) -> bytes:
    """The AES-256 key of one direction (sender -> receiver) of one link of one plane."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"bulk secret of {len(secret)} bytes, expected {SECRET_BYTES}")
    info = INFO + run.encode() + b"\0" + struct.pack(">IHH", plane, sender, receiver)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _nonce(sender: int, receiver: int, counter: int) -> bytes:
    return NONCE.pack(sender, receiver, counter)


class Sealer:
    """One direction of one link: this host (sender) to `receiver`, for one plane."""

    def __init__(self, secret: bytes, run: str, plane: int, sender: int, receiver: int):
        self.plane, self.sender, self.receiver = plane, sender, receiver
        self.aead = AESGCM(link_key(secret, run, plane, sender, receiver))
        self.counter = 0  # the next frame's; never goes back under this key

    def seal(self, frames: list) -> list:
        """[header, *arrays] (protocol.encode's frames) -> [envelope, sealed header, *sealed arrays]."""
        return self.seal_reserved(self.reserve(frames), frames)[0]

    def reserve(self, frames: list) -> int:
        """The message's first counter, taken in send order (the receiver accepts counters only upwards) and before
        sealing: an exception half-way never leads to a reuse."""
        c0 = self.counter
        self.counter += len(frames)
        return c0

    def seal_reserved(self, c0: int, frames: list) -> tuple[list, float]:
        """Seal under the counters reserved at c0: (the sealed frames, this thread's CPU-seconds for it). Safe to
        run on another thread (the frames' buffers must stay unchanged until it returns)."""
        t0 = time.thread_time()
        env = ENVELOPE.pack(MAGIC, self.plane, self.sender, self.receiver, c0)
        head = bytes(frames[0])
        out = [env, self.aead.encrypt(_nonce(self.sender, self.receiver, c0), head, env)]
        ad = env + head
        for i, f in enumerate(frames[1:], start=1):
            out.append(self.aead.encrypt(_nonce(self.sender, self.receiver, c0 + i), _bytes(f), ad))
        return out, time.thread_time() - t0


class Opener:
    """Every direction into this host (`receiver`) for one plane: the keys of the plane's other hosts and the
    lowest counter still accepted from each."""

    def __init__(self, secret: bytes, run: str, plane: int, receiver: int, senders: list[int]):
        self.plane, self.receiver = plane, receiver
        self.aead = {s: AESGCM(link_key(secret, run, plane, s, receiver)) for s in senders}
        self.next = dict.fromkeys(senders, 0)
        # the connection (ZeroMQ routing identity) each sender's first authentic message came over: later ones must
        # come over it too, so a recorded message played again over another connection cannot overtake the
        # sender's own queue and make its genuine messages look replayed (they are in order on one connection)
        self.via: dict[int, bytes] = {}

    def open(self, frames: list, via: bytes | None = None) -> tuple[int, list[bytes]]:
        """(sender, [header, *arrays] in plaintext) of a sealed message that came over connection `via`, or
        BulkError. The replay window moves only once every frame has verified: a forged message changes nothing."""
        sender, c0, env = self.check(frames, via)
        plain, _ = self.decrypt(sender, c0, env, frames)
        self.commit(sender, c0, len(frames), via)
        return sender, plain

    def check(self, frames: list, via: bytes | None = None) -> tuple[int, int, bytes]:
        """The envelope of a sealed message: (sender, first counter, envelope), or BulkError / OtherPlane. Nothing
        is decrypted and the window does not move."""
        if len(frames) < 2:
            raise BulkError(f"{len(frames)} frame(s): not a sealed message")
        env = bytes(_bytes(frames[0]))
        if len(env) != ENVELOPE.size:
            raise BulkError(f"envelope of {len(env)} bytes, expected {ENVELOPE.size}")
        magic, plane, sender, receiver, c0 = ENVELOPE.unpack(env)
        if magic != MAGIC:
            raise BulkError("not a sealed message (magic)")
        if plane != self.plane:
            raise OtherPlane(f"sealed for plane {plane}, this is plane {self.plane}")
        if receiver != self.receiver or sender not in self.aead:
            raise BulkError(f"sealed from host {sender} to host {receiver}: not a link of this host")
        self._admissible(sender, c0, via)
        return sender, c0, env

    def _admissible(self, sender: int, c0: int, via: bytes | None) -> None:
        """BulkError unless counters from c0 on are still open for `sender` and `via` is its connection (or none is
        bound yet)."""
        if c0 < self.next[sender]:
            raise BulkError(f"host {sender}'s counter {c0} was already used (replayed or reordered)")
        if via is not None and self.via.get(sender, via) != via:
            raise BulkError(f"a message of host {sender} over another connection than host {sender}'s")

    def decrypt(self, sender: int, c0: int, env: bytes, frames: list) -> tuple[list[bytes], float]:
        """([header, *arrays] in plaintext, this thread's CPU-seconds) of a message `check` passed, or BulkError.
        Safe to run on another thread; the window moves only in `commit`."""
        aead = self.aead[sender]
        t0 = time.thread_time()
        try:
            head = aead.decrypt(_nonce(sender, self.receiver, c0), _bytes(frames[1]), env)
            ad = env + head
            arrays = [aead.decrypt(_nonce(sender, self.receiver, c0 + i), _bytes(f), ad)
                      for i, f in enumerate(frames[2:], start=1)]
        except InvalidTag:
            raise BulkError(f"a frame from host {sender} failed authentication") from None
        return [head, *arrays], time.thread_time() - t0

    def commit(self, sender: int, c0: int, nframes: int, via: bytes | None = None) -> None:
        """An authentic message is taken: the window moves past its counters (and the sender is bound to the
        connection it came over). Checked again here, in arrival order, so that of two authentic copies opened
        side by side only the first is taken."""
        self._admissible(sender, c0, via)
        if via is not None:
            self.via[sender] = via
        self.next[sender] = c0 + nframes - 1


def _bytes(frame) -> memoryview:
    """A flat byte view of a frame (bytes, a zmq.Frame received with copy=False, a numpy buffer) without copying."""
    buf = getattr(frame, "buffer", frame)
    view = memoryview(buf)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")
