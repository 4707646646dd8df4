"""`dptrain bench --workers ... --ceiling`: what N processes on this host compute when they have nothing to share.

N processes, started as the launcher starts its workers (the same BLAS threads, niceness and scheduler slice), each
run forward + backward of a shard of batch // N images with the workers' code (`shard_gradient`, the hidden Linear
factored where `launch` would factor it) in a loop; after their warm-up they start together and run for a common
window. Nothing is exchanged, reduced or applied: img/s (the processes' rates summed) is the most `launch --workers N`
can reach on this machine, and dptrain's img/s over it (`of_ceiling`) is what its data plane and coordination keep.
Where N exceeds the cores, the ceiling itself falls below N = cores: smaller shards, shared cores."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from .. import config as config_mod
from ..compute import shard_gradient
from ..distributed import timeslice
from ..distributed.reduce import one_host_factored
from ..distributed.session import lower_priority, worker_setup
from ..nn.model import build_model
from ..nn.params import ParamStore
from ..nn.threads import match_blas_threads

CHILD = "--ceiling-child"


def run_ceiling(n: int, cfg: config_mod.Config, classes: int, warmup: int, window_s: float) -> dict:
    """One bench row: `impl` "ceiling", the N processes' summed img/s over the common window."""
    env, nice = worker_setup(cfg, n)
    spec = json.dumps({"config": config_mod.to_dict(cfg), "workers": n, "classes": classes, "warmup": warmup})
    procs = []
    try:
        for r in range(n):
            p = subprocess.Popen([sys.executable, "-m", "dptrain.bench.ceiling", CHILD, str(r), spec], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
            procs.append(p)
            lower_priority(p.pid, nice, f"ceiling process {r}")
        for r, p in enumerate(procs):  # each says "ready" after its warm-up steps
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bench --ceiling: process {r} of {n} failed before its warm-up ended")
        t_go = time.time()
        for p in procs:
            p.stdin.write(f"{t_go + window_s}\n")
            p.stdin.flush()
        done = []
        for r, p in enumerate(procs):
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"bench --ceiling: process {r} of {n} died during the window (exit {p.wait()})")
            done.append(json.loads(line))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    # each process's own rate over its own window (the go signal to the end of its last step, which ends up to a
    # step past the common window's end), summed
    return {"impl": "ceiling", "transport": "none", "workers": n, "shard": cfg.train.batch_size // n,
            "images_per_s": sum(d["images"] / (d["end"] - t_go) for d in done),
            "window_s": max(d["end"] for d in done) - t_go}


def _child(rank: int, spec: dict) -> None:
    timeslice.apply_from_env()
    cfg = config_mod.from_dict(spec["config"])
    n, classes = spec["workers"], spec["classes"]
    store = ParamStore(np.float32)
    model = build_model(cfg.model, classes, cfg.data.image_size, store, rng=np.random.default_rng(0))
    match_blas_threads(cfg.train.short_blas_spin)
    layer = one_host_factored(cfg, model, n)
    if layer is not None:
        layer.factored = True
    shard = cfg.train.batch_size // n + (rank < cfg.train.batch_size % n)
    rng = np.random.default_rng(rank)
    size = cfg.data.image_size
    images = rng.integers(0, 256, (4 * max(shard, 1), size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, len(images)).astype(np.int64)
    steps = 0

    def step() -> None:
        nonlocal steps
        idx = rng.choice(len(images), shard, replace=False)
        shard_gradient(model, images, labels, idx, epoch=0, global_count=cfg.train.batch_size, data=cfg.data,
                       seed=cfg.train.seed)
        steps += 1

    for _ in range(max(spec["warmup"], 1)):
        step()
    print("ready", flush=True)
    t_end = float(sys.stdin.readline())
    steps = 0
    while time.time() < t_end:
        step()
    print(json.dumps({"images": steps * shard, "end": time.time()}), flush=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == CHILD:
    _child(int(sys.argv[2]), json.loads(sys.argv[3]))
