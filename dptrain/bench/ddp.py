"""PyTorch DDP (gloo, CPU) with the same model, global batch and number of processes, for `dptrain bench`.

    python -m dptrain.bench.ddp --workers N --result FILE [--batch-size 64 --image-size 64 --classes 62
                                --steps 10 --warmup 2 --threads T --model-json '{...}']
    python -m dptrain.bench.ddp --rank R --world W --master ADDR:PORT --result FILE [same options] [--iface eth0]
    python -m dptrain.bench.ddp --ring-cpu W [--params P]    gloo's ring alone: CPU-seconds per rank (the plan's
                                                              gloo_bytes_per_cpu_s)

One node (`--workers N`, for `bench --compare torch`): N ranks from torch.multiprocessing.spawn, rendezvous over
tcp://127.0.0.1:PORT, each with T intra-op threads (default cores // N). Many nodes (`--rank/--world/--master`, for
`bench --hosts`): this process is rank R of W, rendezvous tcp://ADDR:PORT (rank 0 hosts the store there; set
GLOO_SOCKET_IFNAME to pin gloo's interface), T threads (default 1). Each rank trains on its contiguous shard of a
synthetic global batch (float tensors already in memory: no decode, no augmentation, which favours PyTorch a little):
loss + backward (gradient all-reduce) + clip + SGD. Rank 0 writes {"images_per_s", "step_ms", ...} to FILE; the time
is between two barriers around the timed steps. In the many-node mode rank 0 also times the identical step without
the all-reduce (under `net.no_sync()`, between barriers too) and reports `nosync_ms` and `exposed_comm_ms` (the
difference: the communication DDP did not hide behind backward), and the bytes its --iface sent and received during
the timed DDP steps (/sys/class/net/IFACE/statistics, read inside its own network namespace).
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

from ..config import Config, ModelConfig
from ..nn.torch_ref import build_torch_model, torch_sgd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iface_bytes(iface: str) -> dict[str, int] | None:
    """{"tx": bytes, "rx": bytes} sent and received so far by a network interface of this namespace (None: no such)."""
    try:
        return {k: int(open(f"/sys/class/net/{iface}/statistics/{k}_bytes").read()) for k in ("tx", "rx")}
    except (OSError, ValueError):
        return None


def _spawned(rank: int, a: argparse.Namespace, port: int) -> None:
    _rank_main(rank, a, f"tcp://127.0.0.1:{port}")


def _rank_main(rank: int, a: argparse.Namespace, init_method: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=a.workers,
                            timeout=datetime.timedelta(seconds=a.rendezvous_timeout_s))
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

    def timed(sync: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            if sync:
                step()
            else:
                with net.no_sync():  # the same step, gradients stay local (DDP still broadcasts BN buffers)
                    step()
        dist.barrier()
        return (time.perf_counter() - t0) / a.steps

    for _ in range(a.warmup):
        step()
    before = iface_bytes(a.iface) if a.iface else None
    sec = timed(True)
    after = iface_bytes(a.iface) if a.iface else None
    row = {"impl": "torch-ddp", "transport": "gloo", "workers": a.workers, "threads": a.threads,
           "images_per_s": a.batch_size / sec, "step_ms": sec * 1e3, "steps": a.steps,
           "torch_version": torch.__version__}
    if a.exposed:
        nosync = timed(False)
        row.update(nosync_ms=nosync * 1e3, exposed_comm_ms=(sec - nosync) * 1e3)
    if before and after:
        row.update({f"{a.iface}_{k}_bytes": after[k] - before[k] for k in ("tx", "rx")})
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


def _ring_rank(rank: int, world: int, port: int, params: int, repeats: int, result: str) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.ones(params)
    dist.all_reduce(t)  # warm-up: connections, buffers
    dist.barrier()
    c0 = time.process_time()  # this rank's CPU, gloo's threads included
    for _ in range(repeats):
        dist.all_reduce(t)
    cpu = (time.process_time() - c0) / repeats
    dist.barrier()
    with open(f"{result}.{rank}", "w") as f:
        json.dump({"cpu_s": cpu}, f)
    dist.destroy_process_group()


def ring_cpu(world: int, params: int, repeats: int = 8) -> dict:
    """gloo's ring all-reduce of `params` float32 over `world` ranks on this host (loopback, 1 thread each): the
    CPU-seconds of one rank per all-reduce and the bytes a rank sends per CPU-second (2(W−1)/W of the tensor; it
    receives as many and sums half of them) — the plan's gloo_bytes_per_cpu_s."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "ring")
        mp.spawn(_ring_rank, args=(world, free_port(), params, repeats, result), nprocs=world, join=True)
        cpu = [json.load(open(f"{result}.{r}"))["cpu_s"] for r in range(world)]
    sent = 2 * (world - 1) / world * 4 * params
    mean = sum(cpu) / world
    return {"world": world, "params": params, "repeats": repeats, "cpu_s_per_rank": mean,
            "bytes_sent_per_rank": sent, "gloo_bytes_per_cpu_s": sent / mean}


def run_ddp(workers: int, batch_size: int, image_size: int, classes: int, steps: int, warmup: int,
            threads: int | None = None, model: dict | None = None, timeout_s: float = 1800.0) -> dict:
    """Run the DDP benchmark in a fresh interpreter (torch never loads into the caller) and return its result."""
    import tempfile
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "ddp.json")
        cmd = [sys.executable, "-m", "dptrain.bench.ddp", "--workers", str(workers), "--result", result,
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


def parse_master(text: str) -> tuple[str, int]:
    """"ADDR:PORT" -> (ADDR, PORT); ValueError names the text."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--master wants ADDR:PORT, got {text!r}")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--workers", type=int, help="one node: spawn this many ranks")
    mode.add_argument("--rank", type=int, help="many nodes: this process's rank (with --world and --master)")
    mode.add_argument("--ring-cpu", type=int, metavar="W",
                      help="gloo's ring all-reduce over W ranks on loopback: CPU per rank and bytes per CPU-second "
                           "(the plan's gloo_bytes_per_cpu_s); --params elements, JSON on stdout")
    ap.add_argument("--world", type=int, default=0, help="many nodes: number of ranks")
    ap.add_argument("--master", default="", help="many nodes: ADDR:PORT of rank 0's rendezvous store")
    ap.add_argument("--iface", default="", help="many nodes: report this interface's bytes over the timed steps")
    ap.add_argument("--rendezvous-timeout-s", type=float, default=300.0)
    ap.add_argument("--params", type=int, default=9_434_462, help="with --ring-cpu: tensor elements (float32)")
    ap.add_argument("--result", default="")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model-json", default="")
    a = ap.parse_args()
    if a.ring_cpu is not None:
        if a.ring_cpu < 2 or a.params < 1:
            ap.error("--ring-cpu wants at least 2 ranks and --params >= 1")
        print(json.dumps(ring_cpu(a.ring_cpu, a.params)))
        return
    if not a.result:
        ap.error("--result is required")
    if a.rank is not None:  # one rank of a many-node job
        if not 0 <= a.rank < a.world:
            ap.error(f"--rank {a.rank} must be in 0..{a.world - 1} (--world {a.world})")
        try:
            host, port = parse_master(a.master)
        except ValueError as e:
            ap.error(str(e))
        a.workers, a.threads, a.exposed = a.world, a.threads or 1, True
        _rank_main(a.rank, a, f"tcp://{host}:{port}")
        return
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    a.exposed = False
    import torch.multiprocessing as mp
    mp.spawn(_spawned, args=(a, free_port()), nprocs=a.workers, join=True)


if __name__ == "__main__":
    main()
