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
        links, one row per H; writes bench-hosts.csv and bench-hosts.json into --out (dptrain/bench_hosts.py).

Model and training keys can be overridden like in `dptrain train` (`--model.widths=[8,16]`); with --hosts every
override (`--dist.wire_dtype=float16`, `--wire-dtype float16`) is passed to `dptrain launch` unchanged. Warm-up
steps are never timed. Logs and progress bars go to stderr; with --json stdout holds only JSON (one object, or one
line per row with --workers or --hosts).

    dptrain bench --tta TARGET [--config F] [--data DIR] [--workers 2] [--epochs E] [--repeat R] [--seeds 0,1,2]
                  [--stop-at-target]
        time to accuracy: dptrain and its PyTorch DDP twin trained with one recipe, epochs and seconds from process
        start to TARGET validation accuracy, tta.json and tta.png in --out (dptrain/bench_tta.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from . import config as config_mod, log
from .distributed.session import physical_cores

CSV_KEYS = ["impl", "transport", "workers", "images_per_s", "speedup", "efficiency", "vs_torch", "of_ceiling", "step_s",
            "compute_s", "comm_s", "reduce_s", "update_s", "serial_s", "update_by", "coordinator_frac", "pss_total_mb",
            "pss_coordinator_mb", "pss_worker_mean_mb", "images_mb", "blas_threads", "threads"]


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
                        "exchange (the most launch can reach here; bench_ceiling.py) and report dptrain's share of it")
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
                        "(--steps compared, default 20; dptrain/bench_repro.py)")
    p.add_argument("--no-progress", action="store_true")
    t = p.add_argument_group("time to accuracy (--tta; dptrain/bench_tta.py)")
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
    from .cli import parse_overrides
    overrides = parse_overrides(extra)
    base = {"train.batch_size": str(args.batch_size), "data.image_size": str(args.image_size)}
    try:
        return config_mod.load(None, {**base, **overrides}), overrides
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"dptrain bench: config error: {e}") from None


def main(args: argparse.Namespace, extra: list[str]) -> int:
    if getattr(args, "tta_merge", None) or getattr(args, "tta", None) is not None:
        from .bench_tta import run as run_tta, run_merge
        args.out = args.out or "bench-tta"
        return run_merge(args) if getattr(args, "tta_merge", None) else run_tta(args, extra)
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
        from .bench_hosts import run as run_hosts
        return run_hosts(args, extra)
    cfg, overrides = _config(args, extra)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("dptrain bench: --steps must be >= 1 and --warmup >= 0")
    if getattr(args, "agree", None):
        from .bench_repro import run as run_agree
        return run_agree(args, cfg, overrides)
    if args.workers is None:
        from .bench_local import format_local, run_local_bench
        if args.rounds < 1:
            raise SystemExit("dptrain bench: --rounds must be >= 1")
        r = run_local_bench(cfg, args.classes, args.threads, args.warmup, args.steps, args.compare == "torch",
                            progress=not args.no_progress, rounds=args.rounds)
        print(json.dumps(r) if args.json else format_local(r), flush=True)
        return 0
    return run_dist(args, cfg, overrides)


def run_dist(args, cfg: config_mod.Config, overrides: dict[str, str]) -> int:
    from .bench_dist import run_workers, synth_dataset
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
        from .torch_ref import require_torch
        require_torch()
    need = args.batch_size * (args.warmup + args.steps)
    if args.images < args.batch_size:
        raise SystemExit(f"dptrain bench: --images {args.images} is smaller than one batch ({args.batch_size})")
    if args.images < need:
        lg.info(f"{args.images} images < {need} needed for one epoch of steps: the run spans several epochs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = synth_dataset(args.images, args.image_size, args.classes, args.data_dir, not args.no_progress)
    if args.compare == "torch":
        from .bench_ddp import run_ddp
        model = config_mod.to_dict(cfg)["model"]

    def ddp(n: int) -> dict:
        lg.info(f"PyTorch DDP gloo: {n} rank(s), {args.warmup} warm-up + {args.steps} timed steps")
        r = run_ddp(n, args.batch_size, args.image_size, args.classes, args.steps, args.warmup, model=model)
        lg.info(f"  {r['images_per_s']:.1f} img/s")
        return r

    def ours(n: int, transport: str) -> dict:
        lg.info(f"dptrain {transport}: {n} worker(s), {args.warmup} warm-up + {args.steps} timed steps")
        r = run_workers(n, data, out, args, overrides, transport)
        lg.info(f"  {r['images_per_s']:.1f} img/s, coordinator {100 * r['coordinator_frac']:.1f}% "
                f"of the step, PSS {_mb(r['pss_total_mb']).strip()} MB")
        return r

    def ceiling(n: int) -> dict:
        from .bench_ceiling import run_ceiling
        lg.info(f"ceiling: {n} process(es) computing shards of {args.batch_size // n} images, nothing exchanged, "
                f"{args.ceiling_s:g} s")
        ccfg = config_mod.load(None, {"train.batch_size": str(args.batch_size), "data.image_size": str(args.image_size),
                                      "dist.workers": str(n), **overrides})
        r = run_ceiling(n, ccfg, args.classes, args.warmup, args.ceiling_s)
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


def print_rows(rows: list[dict], as_json: bool, table, files: list[Path]) -> None:
    """One JSON line per row on stdout, or the table and the files written."""
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print(table(rows), flush=True)
        print(f"\nwrote {', '.join(map(str, files))}", flush=True)


def median_row(runs: list[dict]) -> dict:
    """One N's rounds as one row: the median round's figures (an even count: the upper one) and every round's img/s
    in `images_per_s_rounds`, in round order."""
    if len(runs) == 1:
        return runs[0]
    ips = [r["images_per_s"] for r in runs]
    row = dict(sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2])
    row.update(images_per_s=statistics.median(ips), images_per_s_rounds=ips, rounds=len(runs))
    return row


def paired_ratio(a: dict, b: dict) -> tuple[float, list[float] | None]:
    """a's img/s over b's. With rounds on both (median_row): the median of each round's own ratio, and those ratios
    (runs paired in time, so a drift between rounds cancels); else the plain ratio and None."""
    x, y = a.get("images_per_s_rounds"), b.get("images_per_s_rounds")
    if x and y and len(x) == len(y):
        ratios = [p / q for p, q in zip(x, y)]
        return statistics.median(ratios), ratios
    return a["images_per_s"] / b["images_per_s"], None


def add_scaling(rows: list[dict]) -> None:
    """speedup / efficiency against the smallest N of the same implementation and transport (with rounds: the
    median of each round's own ratio, so a drift between rounds cancels); dptrain vs torch."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["impl"], r["transport"]), []).append(r)
    for group in groups.values():
        base = min(group, key=lambda r: r["workers"])
        for r in group:
            _set_ratio(r, "speedup", base)
            r["efficiency"] = r["speedup"] * base["workers"] / r["workers"]
    for impl, key in (("torch-ddp", "vs_torch"), ("ceiling", "of_ceiling")):
        others = {r["workers"]: r for r in rows if r["impl"] == impl}
        for r in rows:
            if r["impl"] == "dptrain" and r["workers"] in others:  # against the same round's other run
                _set_ratio(r, key, others[r["workers"]])


def _set_ratio(r: dict, key: str, other: dict) -> None:
    """r[key] = paired_ratio(r, other), and r[key + "_rounds"] when there were rounds."""
    r[key], rounds = paired_ratio(r, other)
    if rounds is not None:
        r[f"{key}_rounds"] = rounds


def format_table(rows: list[dict]) -> str:
    head = (f"{'impl':<10}{'transport':<10}{'N':>3}{'img/s':>9}{'speedup':>9}{'eff':>6}{'vs torch':>9}"
            f"{'step ms':>9}{'compute':>9}{'comm':>8}{'reduce':>8}{'update':>8}{'serial':>8}{'ser%':>7}{'PSS MB':>9}"
            f"{'/worker':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = lambda k: f"{1e3 * r[k]:8.1f}" if k in r else f"{'':>8}"  # noqa: E731
        lines.append(
            f"{r['impl']:<10}{r['transport']:<10}{r['workers']:>3}{r['images_per_s']:9.1f}{r['speedup']:9.2f}"
            f"{r['efficiency']:6.2f}" + (f"{r['vs_torch']:9.2f}" if "vs_torch" in r else f"{'':>9}")
            + f"{1e3 * r['step_s'] if 'step_s' in r else r.get('step_ms', 0.0):9.1f}"
            + (f"{ms('compute_s')} {ms('comm_s')}{ms('reduce_s')}{ms('update_s')}{ms('serial_s')}"
               f"{100 * r.get('coordinator_frac', 0.0):6.1f}%{_mb(r['pss_total_mb'])}{_mb(r['pss_worker_mean_mb'])}"
               if "compute_s" in r else ""))
    for r in rows:
        if "images_per_s_rounds" in r:
            lines.append(f"{r['impl']} {r['transport']} N = {r['workers']}, {r['rounds']} rounds: img/s "
                         + " ".join(f"{v:.1f}" for v in r["images_per_s_rounds"])
                         + ("; speedup " + " ".join(f"{v:.2f}" for v in r["speedup_rounds"])
                            if "speedup_rounds" in r else "")
                         + ("; vs torch " + " ".join(f"{v:.2f}" for v in r["vs_torch_rounds"])
                            if "vs_torch_rounds" in r else "")
                         + ("; of ceiling " + " ".join(f"{v:.2f}" for v in r["of_ceiling_rounds"])
                            if "of_ceiling_rounds" in r else ""))
    for r in rows:
        if "of_ceiling" in r:
            lines.append(f"{r['impl']} {r['transport']} N = {r['workers']}: {r['of_ceiling']:.2f} of the ceiling "
                         f"(N processes computing their shards with nothing to exchange)")
    return "\n".join(lines)


def _mb(v) -> str:
    return f"{'-':>9}" if v is None else f"{v:9.0f}"


def write_rows(rows: list[dict], csv_path: Path, keys: list[str]) -> None:
    """rows as CSV (the `keys` columns) and, beside it, as JSON (every field)."""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    csv_path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def write_outputs(rows: list[dict], out: Path) -> None:
    write_rows(rows, out / "bench.csv", CSV_KEYS)
    plot_scaling(rows, out / "bench.png")


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['impl']} ({r['transport']})", []).append(r)
    for label, g in groups.items():
        g = sorted(g, key=lambda r: r["workers"])
        ns = [r["workers"] for r in g]
        a1.plot(ns, [r["images_per_s"] for r in g], "o-", label=label)
        a2.plot(ns, [r["efficiency"] for r in g], "o-", label=label)
    cores = physical_cores()
    ns_all = sorted({r["workers"] for r in rows})
    ours = [r for r in rows if r["impl"] == "dptrain"]
    if ours:  # ideal: the smallest N's speed times min(N, cores) / min(N0, cores); N beyond the cores adds nothing
        base = min(ours, key=lambda r: r["workers"])
        per = base["images_per_s"] / min(base["workers"], cores)
        a1.plot(ns_all, [per * min(n, cores) for n in ns_all], ":", color="grey", label="ideal (min(N, cores))")
        a2.plot(ns_all, [min(n, cores) / n * min(base["workers"], cores) / base["workers"] for n in ns_all], ":",
                color="grey", label="ideal")
    for ax in (a1, a2):
        ax.axvline(cores, color="grey", alpha=0.5, lw=1)
        ax.annotate(f"{cores} cores", (cores, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                    textcoords="offset points", fontsize=8, color="grey")
    for ax, ylabel in ((a1, "images / s"), (a2, "efficiency (speed-up / N)")):
        ax.set_xlabel("workers N")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["workers"] for r in rows}), [str(n) for n in sorted({r["workers"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend()
    a2.set_ylim(0, max(1.1, 1.1 * max(r["efficiency"] for r in rows)))  # above 1 on a loaded machine
    beyond = [n for n in ns_all if n > cores]
    fig.suptitle(f"dptrain bench ({cores} physical cores"
                 + (f"; N = {', '.join(map(str, beyond))} exceed them: workers share cores)" if beyond else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
