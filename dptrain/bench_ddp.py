"""PyTorch DDP (gloo, CPU) with the same model, global batch and number of processes, for `bench --compare torch`.

    python -m dptrain.bench_ddp --workers N --result FILE [--batch-size 64 --image-size 64 --classes 62
                                --steps 10 --warmup 2 --threads T --model-json '{...}']

N ranks from torch.multiprocessing.spawn, rendezvous over tcp://127.0.0.1:PORT, each with T intra-op threads
(default cores // N); each rank trains on its shard of a synthetic global batch (float tensors already in memory: no
decode, no augmentation, which favours PyTorch a little), loss + backward (gradient all-reduce) + clip + SGD.
Rank 0 writes {"images_per_s", "step_ms", ...} to FILE; the time is between two barriers around the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, a: argparse.Namespace, port: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .config import Config, ModelConfig
    from .torch_ref import build_torch_model, torch_sgd
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.workers)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    mcfg = ModelConfig(**json.loads(a.model_json)) if a.model_json else ModelConfig()
    net = DDP(build_torch_model(mcfg, a.classes, a.image_size))
    opt = torch_sgd(net, Config().train)
    lo, hi = rank * a.batch_size // a.workers, (rank + 1) * a.batch_size // a.workers  # contiguous shard
    rng = np.random.default_rng(rank)
    x = torch.from_numpy(rng.standard_normal((hi - lo, 3, a.image_size, a.image_size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, a.classes, hi - lo))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    for _ in range(a.warmup):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dist.barrier()
    sec = (time.perf_counter() - t0) / a.steps
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump({"impl": "torch-ddp", "transport": "gloo", "workers": a.workers, "threads": a.threads,
                       "images_per_s": a.batch_size / sec, "step_ms": sec * 1e3,
                       "torch_version": torch.__version__}, f)
    dist.destroy_process_group()


def run_ddp(workers: int, batch_size: int, image_size: int, classes: int, steps: int, warmup: int,
            threads: int | None = None, model: dict | None = None, timeout_s: float = 1800.0) -> dict:
    """Run the DDP benchmark in a fresh interpreter (torch never loads into the caller) and return its result."""
    import tempfile
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "ddp.json")
        cmd = [sys.executable, "-m", "dptrain.bench_ddp", "--workers", str(workers), "--result", result,
               "--batch-size", str(batch_size), "--image-size", str(image_size), "--classes", str(classes),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
        if model:
            cmd += ["--model-json", json.dumps(model)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(f"PyTorch DDP with {workers} ranks failed (exit {proc.returncode})")
        with open(result) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model-json", default="")
    a = ap.parse_args()
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(a, free_port()), nprocs=a.workers, join=True)


if __name__ == "__main__":
    main()
