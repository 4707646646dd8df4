"""The PyTorch twin of a dptrain run, for `dptrain bench --tta`: the same recipe, data and split in DDP (gloo, CPU).

    python -m dptrain.bench.tta_torch --config RUN.toml --workers N --metrics FILE [--threads T]

N ranks from torch.multiprocessing.spawn (rendezvous on 127.0.0.1, T intra-op threads each, default cores // N).
What is the same as dptrain: the dataset, its decode cache and train/val split (load_dataset), the global batches
(dptrain.data.sampler.Sampler, each rank a contiguous shard), the augmentation (dptrain.data.augment.make_batch, the
same draws per image), the network (torch_ref.build_torch_model, BN eps/momentum from the config), the schedule
(optim.lr_at: linear warmup + cosine), momentum, weight decay (weights only, or every tensor with
train.decay_bn_and_bias), label smoothing, global-norm clipping and patience: what a training script chooses. What
is PyTorch's own, the defaults a PyTorch user gets without asking: the initialisation (the modules' defaults, seeded
with train.seed), BatchNorm's momentum 0.1 and eps 1e-5 (whatever model.bn_momentum / bn_eps say), BN statistics per
rank with rank 0's running statistics broadcast by DDP, the kernels, and no average of the weights
(train.ema_epochs: PyTorch has none built in; the twin evaluates its live weights). For a like-for-like run give
dptrain the same: --model.init=pytorch --model.bn_momentum=0.1 --model.bn_eps=1e-5 --train.ema_epochs=0. Validation
is sharded over the ranks and summed (all_reduce). After every epoch rank 0 appends {"epoch", "step", "train_loss",
"train_acc", "val_loss", "val_acc", "lr", "time"} to FILE (`time`: time.time()).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .. import config as config_mod
from ..data.augment import make_batch
from ..data.dataset import load_dataset
from ..data.sampler import Sampler, shard_bounds
from ..nn.torch_ref import build_torch_model
from ..optim import lr_at
from .ddp import free_port

TORCH_BN_MOMENTUM, TORCH_BN_EPS = 0.1, 1e-5  # nn.BatchNorm2d's defaults


def _rank(rank: int, a: argparse.Namespace, port: int) -> None:
    import dataclasses
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.workers,
                            timeout=datetime.timedelta(seconds=300))
    cfg = config_mod.load(a.config)
    d, t = cfg.data, cfg.train
    ds = load_dataset(d, t.seed, progress=False, workers=1)
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    mcfg = dataclasses.replace(cfg.model, bn_momentum=TORCH_BN_MOMENTUM, bn_eps=TORCH_BN_EPS)
    net = DDP(build_torch_model(mcfg, len(ds.class_names), d.image_size))
    decay = [p for n, p in net.named_parameters() if p.ndim > 1 or t.decay_bn_and_bias]
    rest = [p for n, p in net.named_parameters() if not (p.ndim > 1 or t.decay_bn_and_bias)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=t.lr, momentum=t.momentum)
    sampler = Sampler(ds.train_idx, t.batch_size, t.seed, t.drop_last, t.steps_per_epoch)
    steps = sampler.num_steps()
    warmup, total = int(round(t.warmup_epochs * steps)), steps * t.epochs
    labels = torch.from_numpy(ds.labels)
    vlo, vhi = shard_bounds(len(ds.val_idx), rank, a.workers)
    eval_batch = t.eval_batch_size or max(1, t.batch_size // a.workers)

    def tensor(x):  # (B, H, W, C) float32 -> (B, C, H, W)
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    step, best, bad = 0, -1.0, 0
    for epoch in range(t.epochs):
        net.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss_sum, correct, count (this rank)
        lr = 0.0
        for batch in sampler.batches(epoch):
            lo, hi = shard_bounds(len(batch), rank, a.workers)
            idx = batch[lo:hi]
            x = tensor(make_batch(ds.images, idx, epoch=epoch, seed=t.seed, augment=d.augment,
                                  max_shift=d.max_shift))
            y = labels[idx]
            lr = lr_at(step, base_lr=t.lr, warmup_steps=warmup, total_steps=total, min_lr=t.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=t.label_smoothing)  # DDP averages
            loss.backward()
            if t.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), t.clip_norm)
            opt.step()
            sums += torch.tensor([loss.item() * len(idx), (logits.argmax(1) == y).sum().item(), len(idx)],
                                 dtype=torch.float64)
            step += 1
        net.eval()
        for b in net.module.buffers():  # every rank evaluates with rank 0's running statistics
            dist.broadcast(b, 0)
        vsums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for s in range(vlo, vhi, eval_batch):
                idx = ds.val_idx[s:min(s + eval_batch, vhi)]
                logits = net.module(tensor(make_batch(ds.images, idx)))
                y = labels[idx]
                vsums += torch.tensor([torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                                       (logits.argmax(1) == y).sum().item(), len(idx)], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(vsums)
        val_acc = float(vsums[1] / max(vsums[2], 1))
        if rank == 0:
            rec = {"epoch": epoch + 1, "step": step, "train_loss": float(sums[0] / sums[2]),
                   "train_acc": float(sums[1] / sums[2]), "val_loss": float(vsums[0] / max(vsums[2], 1)),
                   "val_acc": val_acc, "lr": lr, "time": time.time()}
            with open(a.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
        best, bad = (val_acc, 0) if val_acc > best else (best, bad + 1)
        if t.patience and bad >= t.patience:
            break
    # Every rank here before any tears down, then out without interpreter finalization: with gloo, a rank that
    # destroys its group or finalizes while its peer is still in the last collective's teardown was seen to abort
    # ("terminate called without an active exception", SIGABRT) after all its work was done and written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a resolved dptrain config (TOML)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--metrics", required=True, help="append one JSON line per epoch here (rank 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores // workers)")
    a = ap.parse_args()
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(a, free_port()), nprocs=a.workers, join=True)


if __name__ == "__main__":
    main()
