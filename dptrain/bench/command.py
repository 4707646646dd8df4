"""`dptrain bench`: training throughput, in this process or with the real coordinator and workers.

    dptrain bench [--threads 1] [--compare torch] [--json]
        training steps (forward + loss + backward + clip + SGD) of the model on synthetic tensors in this process:
        img/s, per-phase and per-layer-type breakdown; with --compare torch the same network and step in PyTorch
        eager, same threads, and the ratio.
    dptrain bench --workers 1,2,4,8 [--transport shm,socket] [--compare torch] [--images 13000] [--out bench-out]
        `dptrain launch --workers N` for each N on a synthetic face set (rendered once into a cache folder): img/s,
        speed-up and efficiency against the smallest N, the step split (compute / communication / coordinator
        reduce + clip + update) from the run's own timeline, peak PSS of coordinator + workers; with --compare torch
        PyTorch DDP (gloo, CPU) with the same global batch and number of processes. Writes bench.csv, bench.json and
        bench.png (img/s and efficiency against N) into --out.
    dptrain bench --hosts 2,3,4 [--rate 1gbit] [--slots 1] [--no-ddp] [--out bench-out] (root)
        a cluster on one box (launch/netns-cluster.sh, H+1 network namespaces, every link shaped to --rate) per H:
        `dptrain launch --hostfile` with the coordinator inside host h1 and one agent on each other host, then
        PyTorch DDP (gloo) on the same namespaces and links; step time, communication and bytes per step on the
        links, one row per H; writes bench-hosts.csv and bench-hosts.json into --out (dptrain/bench/hosts.py).

Model and training keys can be overridden like in `dptrain train` (`--model.widths=[8,16]`); with --hosts every
override (`--dist.wire_dtype=float16`, `--wire-dtype float16`) is passed to `dptrain launch` unchanged. Warm-up
steps are never timed. Logs and progress bars go to stderr; with --json stdout holds only JSON (one object, or one
line per row with --workers or --hosts).

    dptrain bench --tta TARGET [--config F] [--data DIR] [--workers 2] [--epochs E] [--repeat R] [--seeds 0,1,2]
                  [--stop-at-target]
        time to accuracy: dptrain and its PyTorch DDP twin trained with one recipe, epochs and seconds from process
        start to TARGET validation accuracy, tta.json and tta.png in --out (dptrain/bench/tta.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import config as config_mod, log
from ..distributed.session import physical_cores
from ..flags import parse_overrides
from ..nn import torch_ref
from . import ceiling as ceiling_bench, ddp as ddp_bench, hosts as hosts_bench, local, repro, tta, workers
from .report import (
    add_scaling,
    format_table,
    mb,
    median_row,
    print_rows,
    write_outputs,
)


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default=None,
                   help="comma list of worker counts, e.g. 1,2,4,8 or auto (= physical cores; absent: this process)")
    p.add_argument("--compare", choices=["torch"], default=None, help="also time the same model in PyTorch")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (single-process bench)")
    p.add_argument("--hosts", default=None,
                   help="comma list of host counts H, e.g. 2,3,4: dptrain and DDP across H namespace hosts (root)")
    p.add_argument("--rate", default="1gbit", help="with --hosts: every link's rate, a tc rate or off")
    p.add_argument("--slots", type=int, default=1, help="with --hosts: workers (and DDP ranks) per host")
    p.add_argument("--no-ddp", action="store_true", help="with --hosts: dptrain only")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default 64; 16 with --hosts)")
    p.add_argument("--image-size", type=int, default=None, help="(default 64; with --tta: the config's)")
    p.add_argument("--classes", type=int, default=62)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 6 with --hosts)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every N (--workers; with --compare torch, its DDP run too), or the single process "
                        "and its PyTorch twin, this many times, the order reversed each round (ABBA: a machine whose "
                        "speed drifts); medians reported, speedups and dptrain/PyTorch ratios from each round's runs")
    p.add_argument("--ceiling", action="store_true",
                   help="with --workers: also run each N as N processes computing their shards with nothing to "
                        "exchange (the most launch can reach here; bench/ceiling.py) and report dptrain's share of it")
    p.add_argument("--ceiling-s", type=float, default=8.0, help="with --ceiling: seconds each N computes")
    p.add_argument("--transport", default="shm", help="shm, socket or shm,socket (with --workers)")
    p.add_argument("--images", type=int, default=2000, help="size of the synthetic set (with --workers, --hosts)")
    p.add_argument("--data-dir", default=None, help="where the synthetic set is cached (~/.cache/dptrain/bench)")
    p.add_argument("--out", default=None,
                   help="folder for bench.csv / bench.json / bench.png and runs (bench-out; with --tta bench-tta)")
    p.add_argument("--pss-interval", type=float, default=1.0,
                   help="seconds between PSS samples of coordinator + workers (0: do not sample)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--agree", default=None, metavar="A,B",
                   help="steps for which A and B workers (bitwise replays of launch) keep the weights equal to 1e-6 "
                        "(--steps compared, default 20; dptrain/bench/repro.py)")
    p.add_argument("--no-progress", action="store_true")
    t = p.add_argument_group("time to accuracy (--tta; dptrain/bench/tta.py)")
    t.add_argument("--tta", type=float, default=None, metavar="TARGET",
                   help="train dptrain (launch --workers N, default 2) and its PyTorch DDP twin with one recipe; "
                        "epochs and seconds to this validation accuracy")
    t.add_argument("--config", default=None, help="with --tta: TOML config both sides train from")
    t.add_argument("--data", default=None, help="with --tta: dataset folder or .tgz (data.path)")
    t.add_argument("--epochs", type=int, default=None, help="with --tta: train.epochs")
    t.add_argument("--repeat", type=int, default=1, help="with --tta: runs per side, alternating; medians reported")
    t.add_argument("--seeds", default=None, help="with --tta: comma list of train.seed values, each a run per side "
                                                 "(its own init, split and batches); medians and mean curves")
    t.add_argument("--stop-at-target", action="store_true", help="with --tta: stop each side at the target")
    t.add_argument("--no-torch", action="store_true", help="with --tta: dptrain only")
    t.add_argument("--sides", default="dptrain,torch", help="with --tta: which to run (dptrain, torch or both)")
    t.add_argument("--tta-merge", nargs="+", default=None, metavar="TTA_JSON",
                   help="summarise the runs of several tta.json files (same target, CPU, data and recipe) as one: "
                        "OUT/tta.json and tta.png")


def _config(args, extra: list[str]) -> tuple[config_mod.Config, dict[str, str]]:
    overrides = parse_overrides(extra)
    base = {"train.batch_size": str(args.batch_size), "data.image_size": str(args.image_size)}
    try:
        return config_mod.load(None, {**base, **overrides}), overrides
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"dptrain bench: config error: {e}") from None


def main(args: argparse.Namespace, extra: list[str]) -> int:
    if getattr(args, "tta_merge", None) or getattr(args, "tta", None) is not None:
        args.out = args.out or "bench-tta"
        return tta.run_merge(args) if getattr(args, "tta_merge", None) else tta.run(args, extra)
    args.out = args.out or "bench-out"
    if args.image_size is None:
        args.image_size = 64
    hosts = getattr(args, "hosts", None)
    if args.batch_size is None:
        args.batch_size = 16 if hosts else 64
    args.steps_given = args.steps is not None
    if args.steps is None:
        args.steps = 6 if hosts else 10
    if hosts:  # overrides go to `dptrain launch` as they are: not resolved here
        return hosts_bench.run(args, extra)
    cfg, overrides = _config(args, extra)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("dptrain bench: --steps must be >= 1 and --warmup >= 0")
    if getattr(args, "agree", None):
        return repro.run(args, cfg, overrides)
    if args.workers is None:
        if args.rounds < 1:
            raise SystemExit("dptrain bench: --rounds must be >= 1")
        r = local.run_local_bench(cfg, args.classes, args.threads, args.warmup, args.steps, args.compare == "torch",
                            progress=not args.no_progress, rounds=args.rounds)
        print(json.dumps(r) if args.json else local.format_local(r), flush=True)
        return 0
    return run_dist(args, cfg, overrides)


def run_dist(args, cfg: config_mod.Config, overrides: dict[str, str]) -> int:
    lg = log.get()
    try:
        counts = sorted({physical_cores() if w.strip() == "auto" else int(w) for w in args.workers.split(",")
                         if w.strip()})
    except ValueError:
        raise SystemExit(f"dptrain bench: --workers wants a comma list of integers or auto, got {args.workers!r}") \
            from None
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    if not counts or min(counts) < 1 or any(t not in ("shm", "socket") for t in transports):
        raise SystemExit("dptrain bench: --workers needs counts >= 1 and --transport shm and/or socket")
    if args.rounds < 1:
        raise SystemExit("dptrain bench: --rounds must be >= 1")
    if args.compare == "torch":
        torch_ref.require_torch()
    need = args.batch_size * (args.warmup + args.steps)
    if args.images < args.batch_size:
        raise SystemExit(f"dptrain bench: --images {args.images} is smaller than one batch ({args.batch_size})")
    if args.images < need:
        lg.info(f"{args.images} images < {need} needed for one epoch of steps: the run spans several epochs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = workers.synth_dataset(args.images, args.image_size, args.classes, args.data_dir, not args.no_progress)
    if args.compare == "torch":
        model = config_mod.to_dict(cfg)["model"]

    def ddp(n: int) -> dict:
        lg.info(f"PyTorch DDP gloo: {n} rank(s), {args.warmup} warm-up + {args.steps} timed steps")
        r = ddp_bench.run_ddp(n, args.batch_size, args.image_size, args.classes, args.steps, args.warmup, model=model)
        lg.info(f"  {r['images_per_s']:.1f} img/s")
        return r

    def ours(n: int, transport: str) -> dict:
        lg.info(f"dptrain {transport}: {n} worker(s), {args.warmup} warm-up + {args.steps} timed steps")
        r = workers.run_workers(n, data, out, args, overrides, transport)
        lg.info(f"  {r['images_per_s']:.1f} img/s, coordinator {100 * r['coordinator_frac']:.1f}% "
                f"of the step, PSS {mb(r['pss_total_mb']).strip()} MB")
        return r

    def ceiling(n: int) -> dict:
        lg.info(f"ceiling: {n} process(es) computing shards of {args.batch_size // n} images, nothing exchanged, "
                f"{args.ceiling_s:g} s")
        ccfg = config_mod.load(None, {"train.batch_size": str(args.batch_size), "data.image_size": str(args.image_size),
                                      "dist.workers": str(n), **overrides})
        r = ceiling_bench.run_ceiling(n, ccfg, args.classes, args.warmup, args.ceiling_s)
        lg.info(f"  {r['images_per_s']:.1f} img/s")
        return r

    # ABBA: odd rounds run the worker counts, and each count's runs, in the reverse order
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        if args.rounds > 1:
            lg.info(f"round {rnd + 1} of {args.rounds}")
        for n in counts if rnd % 2 == 0 else counts[::-1]:
            jobs = [(lambda n=n, t=t: ours(n, t)) for t in transports] + \
                ([lambda n=n: ddp(n)] if args.compare == "torch" else []) + \
                ([lambda n=n: ceiling(n)] if args.ceiling else [])
            for job in jobs if rnd % 2 == 0 else jobs[::-1]:
                r = job()
                runs.setdefault((r["impl"], r["transport"], n), []).append(r)
    rows = [median_row(runs[("dptrain", t, n)]) for t in transports for n in counts] + \
        ([median_row(runs[("torch-ddp", "gloo", n)]) for n in counts] if args.compare == "torch" else []) + \
        ([median_row(runs[("ceiling", "none", n)]) for n in counts] if args.ceiling else [])
    add_scaling(rows)
    write_outputs(rows, out)
    print_rows(rows, args.json, format_table, [out / "bench.csv", out / "bench.json", out / "bench.png"])
    return 0
