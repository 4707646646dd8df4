"""Is the mesh's AES-GCM work in series with the wire, or beside it? Wall time of one host's stream to another.

    sudo .venv/bin/python bench/cipher_pipeline.py [--mib 36] [--piece-mib 2.25] [--rates 1gbit,4gbit]
        [--threads 1] [--repeat 3] [--json OUT]

Two namespace hosts (launch/netns-cluster.sh, every link shaped with tc tbf to the rate) each run a real MeshLink
(distributed/mesh.py): host 1 sends host 2 `mib` MiB as GATHER pieces of `piece-mib` MiB (what a host's all-gather
is at 16 hosts: its ~2.4 MB slice to each peer), through MeshLink.send (sealed on the cipher pool, sent in order)
and MeshLink._drain (opened on the pool while ZeroMQ's I/O thread goes on receiving), once unsealed (plain) and once
with dist.bulk_cipher = "aes-gcm". The wall time runs from the first send to the last piece opened. If sealing and
opening ran in series with the wire, aes-gcm would take plain + the cipher's CPU time (seal + open of every byte,
printed from the links' own cipher_cpu_s); pipelined, max(plain, one side's cipher time) + about one piece.
The plan's cost model (plan/model.py, the mesh's `wire` term) follows what this measures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dptrain.bench.netns_cluster import Cluster  # noqa: E402
from dptrain.distributed import protocol as P  # noqa: E402
from dptrain.distributed.mesh import MeshLink  # noqa: E402

RUN = "cipherpipe"
KEYS = {"client_public": "x" * 40, "client_secret": "y" * 40}  # sealed sockets never use them as CURVE keys


def role(index: int, address: str, cipher: str, threads: int, total: int, piece: int) -> None:
    """One host: bind, print the endpoint, read the plane (both endpoints, the secret) from stdin, then send
    (index 0) or receive (index 1); the receiver prints {"t_end", "cipher_cpu_s", ...}, the sender {"t0", ...}
and, once the receiver is done, the CPU time of all its threads since its first timed send."""
    ctx = zmq.Context()
    link = MeshLink(ctx, address, KEYS if cipher != "plain" else None, RUN, index, f"h{index}", 1 << 30,
                    "aes-gcm", threads)
    print(link.endpoint, flush=True)
    plane = json.loads(sys.stdin.readline())
    n = plane["pieces"]
    hosts = [[i, ep, "", i * total // 2, (i + 1) * total // 2, f"h{i}"] for i, ep in enumerate(plane["endpoints"])]
    link.configure(hosts, 1, bytes.fromhex(plane["secret"]) if cipher != "plain" else None)
    if index == 0:
        data = np.random.default_rng(0).standard_normal(piece).astype(np.float32)
        time.sleep(0.5)  # the receiver's DEALER and ours connected
        link.send(1, P.Kind.HEARTBEAT, 0, 0, {})  # the connection's first message out of the timed part
        time.sleep(0.2)
        t0, c0 = time.time(), time.process_time()
        for i in range(n):
            link.send(1, P.Kind.GATHER, 1, 0, {"params": data}, lo=i * piece, hi=(i + 1) * piece, scale=1.0)
        link.flush()
        print(json.dumps({"t0": t0, "cipher_cpu_s": link.cipher_cpu_s}), flush=True)
        sys.stdin.readline()  # until the receiver has everything (ZeroMQ still holds the last bytes)
        print(json.dumps({"process_cpu_s": time.process_time() - c0}), flush=True)  # every thread's, ZeroMQ's too
    else:
        got, c0 = 0, time.process_time()
        while got < n:
            if link.sock.poll(50):
                link._drain()
                got = sum(1 for m in link.early if m.kind is P.Kind.GATHER)
        print(json.dumps({"t_end": time.time(), "cipher_cpu_s": link.cipher_cpu_s, "dropped": link.dropped,
                          "process_cpu_s": time.process_time() - c0}),
              flush=True)
    link.close()
    ctx.term()


def one(cluster: Cluster, cipher: str, threads: int, total: int, piece: int) -> dict:
    procs = []
    for i in (0, 1):
        argv = ["ip", "netns", "exec", cluster.ns(i + 1), sys.executable, __file__, "--role", str(i),
                "--address", cluster.addr(i + 1), "--cipher", cipher, "--threads", str(threads),
                "--total", str(total), "--piece", str(piece)]
        procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        endpoints = [p.stdout.readline().strip() for p in procs]
        plane = json.dumps({"endpoints": endpoints, "secret": os.urandom(32).hex(), "pieces": total // piece})
        for p in procs:
            p.stdin.write(plane + "\n")
            p.stdin.flush()
        recv = json.loads(procs[1].stdout.readline())
        send = json.loads(procs[0].stdout.readline())
        procs[0].stdin.write("done\n")
        procs[0].stdin.flush()
        done = json.loads(procs[0].stdout.readline())
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"wall_s": recv["t_end"] - send["t0"], "seal_cpu_s": send["cipher_cpu_s"],
            "open_cpu_s": recv["cipher_cpu_s"], "dropped": recv["dropped"], "process_cpu_s": recv["process_cpu_s"] + done["process_cpu_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=36.0)
    ap.add_argument("--piece-mib", type=float, default=2.25)
    ap.add_argument("--rates", default="1gbit,4gbit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--role", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--cipher", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--piece", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role is not None:
        role(a.role, a.address, a.cipher, a.threads, a.total, a.piece)
        return
    piece = int(a.piece_mib * (1 << 20)) // 4
    total = int(a.mib * (1 << 20)) // 4 // piece * piece
    rows = []
    with Cluster(2, 1) as cluster:
        for rate in a.rates.split(","):
            cluster.shape(rate)
            for rep in range(a.repeat):
                for cipher in (("plain", "aes-gcm") if rep % 2 == 0 else ("aes-gcm", "plain")):  # ABBA
                    r = one(cluster, cipher, a.threads, total, piece)
                    rows.append({"rate": rate, "cipher": cipher, "threads": a.threads, "mib": total * 4 / 2**20,
                                 "piece_mib": piece * 4 / 2**20, "repeat": rep, **r})
                    print(f"{rate:>6} {cipher:8} {1e3 * r['wall_s']:8.1f} ms  seal {1e3 * r['seal_cpu_s']:6.1f} "
                          f"open {1e3 * r['open_cpu_s']:6.1f} ms CPU; both processes {1e3 * r['process_cpu_s']:6.1f} ms CPU",
                          flush=True)
    for rate in a.rates.split(","):
        med = {c: float(np.median([r["wall_s"] for r in rows if r["rate"] == rate and r["cipher"] == c]))
               for c in ("plain", "aes-gcm")}
        cpu = float(np.median([r["seal_cpu_s"] + r["open_cpu_s"] for r in rows
                               if r["rate"] == rate and r["cipher"] == "aes-gcm"]))
        print(f"{rate}: plain {1e3 * med['plain']:.1f} ms, aes-gcm {1e3 * med['aes-gcm']:.1f} ms (+"
              f"{1e3 * (med['aes-gcm'] - med['plain']):.1f}); in series it would be +{1e3 * cpu:.1f} ms "
              f"(seal + open CPU)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
