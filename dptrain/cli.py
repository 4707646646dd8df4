"""`dptrain` command line.

    dptrain data synth --out data/synth            write the LFW-like synthetic set (JPEGs, LFW layout)
    dptrain data digits --out data/digits          scikit-learn's handwritten digits as class folders (32x32)
    dptrain train  --data DIR --epochs E ...       train in this process (no sockets; the reference)
    dptrain launch --workers N ...                 coordinator + N worker processes on this host
    dptrain launch --hostfile FILE | -H a:2,b:2    one agent per host over ssh, workers under it
    dptrain agent  --connect tcp://HOST:PORT ...   run a host's agent by hand (no-ssh mode, Slurm, mpirun)
    dptrain eval   --checkpoint C --data DIR       accuracy of a checkpoint on a folder
    dptrain predict --checkpoint C PATH...         class probabilities of images, folders, .tgz
    dptrain export --checkpoint C --format onnx|torch|safetensors --out F
    dptrain bench  [--workers 1,2,4] [--compare torch]
    dptrain bench  --tta 0.9 --config C            time to accuracy: dptrain vs its PyTorch DDP twin
    dptrain plot   RUN_DIR                          metrics.jsonl -> PNG curves
    dptrain plan   --hosts 1,16 --slots 8 --bandwidth 10gbit   predicted multi-host step time and scaling
    dptrain soak   --steps 2000 --workers 4 | --faults 20       memory soak / fault-injection soak of launch

Training flags are aliases of config keys (`--lr` is `--train.lr`); any key can be set as `--section.key=value`;
`--config FILE.toml` sets many at once. Precedence: defaults < --config < flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as config_mod, log


def worker_count(text: str) -> int:
    """--workers N, or `auto`: one worker per physical core."""
    if text.strip().lower() == "auto":
        from .distributed.session import physical_cores
        return physical_cores()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


# Short flags, each an alias of one config key: (flag, config key, type, choices, help). The one table both the
# parser and the config resolution read; distributed-only ones are the `dist.` keys, offered by `launch` alone.
TRAIN_FLAGS = [
    ("--data", "data.path", str, None, "dataset folder or .tgz"),
    ("--image-size", "data.image_size", int, None, "images are resized to this many pixels square"),
    ("--min-images-per-class", "data.min_images_per_class", int, None, "drop classes with fewer images"),
    ("--epochs", "train.epochs", int, None, None),
    ("--batch-size", "train.batch_size", int, None, "global batch size"),
    ("--lr", "train.lr", float, None, "peak learning rate"),
    ("--out", "train.out", str, None, "run folder"),
    ("--seed", "train.seed", int, None, None),
    ("--batch-invariant", "train.batch_invariant_block", int, None,
     "blocks of B samples summed exactly: bitwise the same weights for any worker count (needs --bn sync)"),
    ("--workers", "dist.workers", worker_count, None,
     "worker processes on this host (0: run in this process; auto: one per physical core)"),
    ("--bn", "dist.bn", str, ["stats", "sync"], None),
    ("--on-worker-failure", "dist.on_worker_failure", str, ["abort", "continue"], None),
    ("--max-worker-restarts", "dist.max_worker_restarts", int, None,
     "under --on-worker-failure continue: replace a lost worker (or ssh-started host agent) at most N times"),
    ("--bind", "dist.bind", str, None, "interface the coordinator listens on"),
    ("--port", "dist.port", int, None, "coordinator port (0: pick a free one)"),
    ("--timeline", "dist.timeline", str, None, "write a Chrome-trace JSON of every phase"),
    ("--checkpoint-every", "train.checkpoint_every_steps", int, None, "also write last.npz every N steps"),
    ("--keep-checkpoints", "train.keep_checkpoints", int, None,
     "with --checkpoint-every: keep the last K as step-NNNNNNNN.npz"),
    ("--checkpoint-signal", "train.checkpoint_signal", str, None,
     "a signal (USR1) that means preempted: checkpoint and exit 75"),
    ("--wire-dtype", "dist.wire_dtype", str, ["float32", "float16"], None),
    ("--plane", "dist.plane", str, ["mesh", "star"], "across hosts: agents reduce among themselves, or via the "
     "coordinator"),
]


# mpirun / horovodrun / torchrun spellings users type out of habit
FLAG_ALIASES = {"--workers": ("-np", "--nproc-per-node")}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_train_flags(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    g = p.add_argument_group("training (each is an alias of a config key; --section.key=value sets any key)")
    g.add_argument("--config", help="TOML file with [data] [model] [train] [dist] tables")
    g.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"], default=None,
                   help="continue from OUT/last.npz (an error if there is none); --resume auto: continue if it "
                        "exists, start fresh otherwise (requeued jobs, scripts)")
    g.add_argument("--stop-at-step", type=int, default=0, help="stop (with a checkpoint) once this step is reached")
    d = p.add_argument_group("distribution") if distributed else None
    for flag, key, typ, choices, text in TRAIN_FLAGS:
        if key.startswith("dist.") and d is None:
            continue
        (d if key.startswith("dist.") else g).add_argument(flag, *FLAG_ALIASES.get(flag, ()), type=typ, choices=choices,
                                                           help=f"{text} ({key})" if text else f"({key})")


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--section.key=value` or `--section.key value` -> {section.key: value}."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise SystemExit(f"dptrain: unknown argument {arg!r} (config keys look like --train.lr=0.1)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise SystemExit(f"dptrain: {arg} needs a value")
            i += 1
            value = extra[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def resolve_config(args: argparse.Namespace, extra: list[str]) -> config_mod.Config:
    overrides = {}
    for flag, key, *_ in TRAIN_FLAGS:
        v = getattr(args, _dest(flag), None)
        if v is not None:
            overrides[key] = str(v)
    overrides.update(parse_overrides(extra))
    base = args.config
    out = overrides.get("train.out")
    if args.resume and not base and out and (Path(out) / "config.toml").exists():
        base = str(Path(out) / "config.toml")  # a resumed run keeps its own config unless told otherwise
    try:
        return config_mod.load(base, overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain: config error: {e}") from None


def cmd_train(args, extra) -> int:
    from .executors import LocalExecutor
    from .train import run_local
    cfg = resolve_config(args, extra)
    factory = LocalExecutor
    if args.replay_workers or args.replay_layout:  # a distributed run's exact sums, in this process
        from .replay import parse_layout, read_membership, replay_executor
        try:
            membership = read_membership(args.replay_membership) if args.replay_membership else None
            factory = replay_executor(parse_layout(args.replay_workers, args.replay_layout), membership)
        except ValueError as e:
            raise SystemExit(f"dptrain train: {e}") from None
    # a bad dataset / checkpoint: one line, no traceback
    summary = run_local(cfg, args.resume, args.stop_at_step, command="train", executor_factory=factory)
    print(json.dumps(summary))
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 done (or stopped at --stop-at-step); EXIT_PREEMPTED (75) stopped by train.checkpoint_signal; 130 stopped
    by Ctrl-C / SIGTERM."""
    from .train import EXIT_PREEMPTED
    return EXIT_PREEMPTED if summary.get("preempted") else 130 if summary.get("stop_requested") else 0


def cmd_launch(args, extra) -> int:
    cfg = resolve_config(args, extra)
    from .distributed.launch import _many_hosts, launch
    from .invariant import check_launch
    check_launch(cfg, _many_hosts(args))
    return launch(cfg, args)


def cmd_eval(args, extra) -> int:
    from .evaluate import evaluate_checkpoint
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError; both messages name the path
        raise SystemExit(f"dptrain eval: {e}") from None
    print(json.dumps(result))
    return 0


def cmd_predict(args, extra) -> int:
    from .predict import FORMATS, predict
    try:
        result = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError; the messages name the path
        raise SystemExit(f"dptrain predict: {e}") from None
    sys.stdout.write(FORMATS[args.format](result))
    if not result.paths:
        print(f"dptrain predict: none of the {len(result.skipped)} image file(s) could be read", file=sys.stderr)
        return 1
    return 0


def cmd_export(args, extra) -> int:
    from .export import export
    try:
        summary = export(args.checkpoint, args.format, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain export: {e}") from None
    print(json.dumps(summary))
    return 0


def cmd_data_synth(args, extra) -> int:
    from .data.synth import generate
    kwargs = {k: v for k, v in (("num_classes", args.classes), ("image_size", args.image_size),
                                ("num_rich", args.rich)) if v is not None}
    summary = generate(args.out, seed=args.seed, workers=args.jobs, **kwargs)
    summary.pop("counts", None)  # per-class counts are in OUT/summary.json
    print(json.dumps(summary))
    return 0


def cmd_data_digits(args, extra) -> int:
    from .bench_tta import make_digits
    print(json.dumps(make_digits(args.out, args.image_size)))
    return 0


def cmd_bench(args, extra) -> int:
    from .bench import main as bench_main
    return bench_main(args, extra)


def cmd_plot(args, extra) -> int:
    from .plot import plot_run
    path = plot_run(args.run, args.output)
    print(path)
    return 0


def cmd_plan(args, extra) -> int:
    from .plan_cli import main as plan_main
    return plan_main(args, extra)


def cmd_soak(args, extra) -> int:
    from .soak import main as soak_main
    return soak_main(args, extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dptrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train in this process")
    add_train_flags(t)
    r = t.add_argument_group("bitwise replay of a distributed run (its dist.* settings: pass its config.toml)")
    r.add_argument("--replay-workers", type=int, default=None, metavar="N",
                   help="compute every step exactly as `launch --workers N` does: the same bits")
    r.add_argument("--replay-layout", default=None, metavar="HxS",
                   help="the same for a multi-host run of H hosts with S workers each (e.g. 2x4)")
    r.add_argument("--replay-membership", default=None, metavar="RUN",
                   help="follow a one-host run's losses (and replacements) under --on-worker-failure continue: "
                        "the steps its metrics.jsonl says fewer ranks computed are computed by those ranks")
    t.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="train with a coordinator and worker processes")
    add_train_flags(la, distributed=True)
    from .distributed.launch import add_launch_flags
    add_launch_flags(la)
    la.set_defaults(func=cmd_launch)

    from .distributed.launch import add_internal_commands
    add_internal_commands(sub)

    e = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="class probabilities of unlabelled images")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or .tgz/.tar")
    pr.add_argument("--top-k", type=int, default=5, help="classes listed per image")
    pr.add_argument("--format", choices=["table", "json", "csv"], default="table")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="write a checkpoint's network as ONNX, a torch state_dict or safetensors")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--format", required=True, choices=["onnx", "torch", "safetensors"])
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=cmd_export)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the LFW-like synthetic face set")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=None, help="number of identities (default: the generator's)")
    s.add_argument("--image-size", type=int, default=None, help="stored image size in pixels")
    s.add_argument("--rich", type=int, default=None, help="identities with many images (the rest have 1-9)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jobs", type=int, default=2, help="render in this many processes")
    s.set_defaults(func=cmd_data_synth)
    dg = dsub.add_parser("digits", help="write scikit-learn's handwritten digits as class folders (a small real set)")
    dg.add_argument("--out", required=True)
    dg.add_argument("--image-size", type=int, default=32)
    dg.set_defaults(func=cmd_data_digits)

    b = sub.add_parser("bench", help="throughput benchmarks")
    from .bench import add_bench_flags
    add_bench_flags(b)
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plot", help="plot a run's metrics.jsonl to PNG")
    pl.add_argument("run")
    pl.add_argument("--output", "-o", default=None)
    pl.set_defaults(func=cmd_plot)

    pn = sub.add_parser("plan", help="predict multi-host step time, traffic and scaling (a cost model)")
    from .plan_cli import add_plan_flags
    add_plan_flags(pn)
    pn.set_defaults(func=cmd_plan)

    so = sub.add_parser("soak", help="long-run memory soak, or fault-injection trials, of launch (soak.py)")
    from .soak import add_soak_flags
    add_soak_flags(so)
    so.set_defaults(func=cmd_soak)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "launch", "bench", "plan", "soak"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    log.setup("coord" if args.command == "launch" else "main")
    return args.func(args, extra) or 0


if __name__ == "__main__":
    sys.exit(main())
