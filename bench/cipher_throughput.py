"""Seal + open throughput, GB per CPU-second, of the mesh's two bulk ciphers (and ChaCha20-Poly1305 for comparison).

    .venv/bin/python bench/cipher_throughput.py [--mib 4] [--messages 48] [--repeat 3] [--json OUT]

Each row streams `messages` messages of `mib` MiB through one loopback TCP PUSH -> PULL pair in this process and
divides the bytes by the process's CPU time (both ends and libzmq's I/O threads: copies and TCP included, as the
planner's `curve_bytes_per_cpu_s` is defined):

  plain tcp          no cipher: what the socket alone costs
  curve              ZeroMQ CURVE (libzmq's, through pyzmq): dist.bulk_cipher = "curve"
  aes-256-gcm        bulk.Sealer / bulk.Opener over a plain socket: dist.bulk_cipher = "aes-gcm"
  chacha20-poly1305  the same framing with ChaCha20-Poly1305 instead (not offered: the comparison the issue asked for)

and the two AEADs alone (no socket): seal + open of the same bytes in memory. The best of `repeat` runs is kept (CPU
time, not wall time: other processes on the machine slow a run down but charge it little CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

import numpy as np
import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dptrain.distributed import protocol as P  # noqa: E402
from dptrain.distributed.bulk import Opener, Sealer, plane_secret  # noqa: E402


def cpu() -> float:
    return time.process_time()


def stream(n: int, frames_of, curve: bool, seal=None, open_=None) -> float:
    """CPU-seconds to push `n` messages through one loopback pair (receiver in a thread of this process)."""
    ctx = zmq.Context(io_threads=1)
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.setsockopt(zmq.LINGER, 0)
    if curve:
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        pull.curve_server, pull.curve_secretkey, pull.curve_publickey = True, ss, sp
        push.curve_serverkey, push.curve_publickey, push.curve_secretkey = sp, cp, cs
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    fr = frames_of()  # warm up the connection (and the handshake) first
    push.send_multipart(seal(fr) if seal else fr, copy=False)
    got = pull.recv_multipart(copy=False)
    if open_:
        open_(got)

    def receive():
        for _ in range(n):
            fr = pull.recv_multipart(copy=False)
            if open_:
                open_(fr)
    t = threading.Thread(target=receive)
    c0 = cpu()
    t.start()
    for _ in range(n):
        fr = frames_of()
        push.send_multipart(seal(fr) if seal else fr, copy=False)
    t.join()
    used = cpu() - c0
    push.close(0)
    pull.close(0)
    ctx.term()
    return used


def aead_rows(nbytes: int, n: int) -> dict:
    data = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    view = memoryview(data).cast("B")
    rows = {}
    for name, cls in (("aes-256-gcm in memory", AESGCM), ("chacha20-poly1305 in memory", ChaCha20Poly1305)):
        a = cls(os.urandom(32))
        c0 = cpu()
        for i in range(n):
            nonce = i.to_bytes(12, "big")
            a.decrypt(nonce, a.encrypt(nonce, view, b"ad"), b"ad")
        rows[name] = cpu() - c0
    return rows


class ChaChaSealer(Sealer):
    def __init__(self, *a):
        super().__init__(*a)
        self.aead = ChaCha20Poly1305(os.urandom(32))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=4.0)
    ap.add_argument("--messages", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    nbytes = int(a.mib * (1 << 20)) // 4 * 4
    grad = np.random.default_rng(1).standard_normal(nbytes // 4).astype(np.float32)

    def frames_of():
        return P.encode(P.Kind.SCATTER, "bench", step=1, rank=0, arrays={"grad": grad}, attempt=0, mesh_id=1, src=0,
                        lo=0, hi=grad.size, scale=1.0)

    def sealed_pair(cls):
        secret = plane_secret()
        s = cls(secret, "bench", 1, 0, 1)
        o = Opener(secret, "bench", 1, 1, [0])
        if cls is ChaChaSealer:
            o.aead[0] = s.aead
        return s.seal, o.open

    cases = {
        "plain tcp": lambda: stream(a.messages, frames_of, False),
        "curve": lambda: stream(a.messages, frames_of, True),
        "aes-256-gcm": lambda: stream(a.messages, frames_of, False, *sealed_pair(Sealer)),
        "chacha20-poly1305": lambda: stream(a.messages, frames_of, False, *sealed_pair(ChaChaSealer)),
    }
    best: dict[str, float] = {}
    for _ in range(a.repeat):
        for name, run in cases.items():
            best[name] = min(best.get(name, float("inf")), run())
        for name, used in aead_rows(nbytes, a.messages).items():
            best[name] = min(best.get(name, float("inf")), used)
    total = a.messages * nbytes
    rows = {name: {"cpu_s": used, "gb_per_cpu_s": total / used / 1e9} for name, used in best.items()}
    print(f"{a.messages} messages of {nbytes / (1 << 20):g} MiB, best CPU time of {a.repeat}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    for name, r in rows.items():
        print(f"  {name:28s} {r['gb_per_cpu_s']:6.2f} GB per CPU-second  ({r['cpu_s']:.3f} CPU-s)")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump({"mib": a.mib, "messages": a.messages, "repeat": a.repeat, "rows": rows}, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
