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
import os
import sys

from . import log
from .flags import add_launch_flags, add_train_flags, options_from, resolve_config
from .train import exit_code

# Each subcommand imports what it runs when it runs: every worker process, agent and `dptrain --help` starts
# through this module, and importing every subcommand's modules up front costs each of them about 0.15-0.25 s
# more (docs/performance-notes.md, cli).


def cmd_train(args, extra) -> int:
    from .executors import LocalExecutor
    from .train import run_local
    cfg = resolve_config(args, extra)
    factory = LocalExecutor
    if args.replay_workers or args.replay_layout:  # a distributed run's exact sums, in this process
        from .distributed.replay import parse_layout, read_membership, replay_executor
        try:
            membership = read_membership(args.replay_membership) if args.replay_membership else None
            factory = replay_executor(parse_layout(args.replay_workers, args.replay_layout), membership)
        except ValueError as e:
            raise SystemExit(f"dptrain train: {e}") from None
    # a bad dataset / checkpoint: one line, no traceback
    summary = run_local(cfg, args.resume, args.stop_at_step, command="train", executor_factory=factory)
    print(json.dumps(summary))
    return exit_code(summary)


def cmd_launch(args, extra) -> int:
    cfg = resolve_config(args, extra)
    from .distributed.invariant import check_launch
    from .launcher.launch import launch
    from .launcher.options import LaunchOptions
    opts = options_from(LaunchOptions, args)
    check_launch(cfg, opts.many_hosts)
    return launch(cfg, opts)


def cmd_eval(args, extra) -> int:
    from .inference.evaluate import evaluate_checkpoint
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError; both messages name the path
        raise SystemExit(f"dptrain eval: {e}") from None
    print(json.dumps(result))
    return 0


def cmd_predict(args, extra) -> int:
    from .inference.predict import FORMATS, predict
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
    from .inference.export import export
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
    from .data.digits import make_digits
    print(json.dumps(make_digits(args.out, args.image_size)))
    return 0


def cmd_bench(args, extra) -> int:
    from .bench.command import main as bench_main
    return bench_main(args, extra)


def cmd_plot(args, extra) -> int:
    from .inference.plot import plot_run
    path = plot_run(args.run, args.output)
    print(path)
    return 0


def cmd_plan(args, extra) -> int:
    from .plan.command import main as plan_main
    return plan_main(args, extra)


def cmd_soak(args, extra) -> int:
    from .soak.command import main as soak_main
    return soak_main(args, extra)


def add_internal_commands(sub) -> None:
    """Commands that launch, agents and operators start: worker, agent, keys."""
    w = sub.add_parser("worker", help="(internal) a worker process; started by launch or an agent")
    w.add_argument("--connect", required=True)
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--run", required=True)
    w.set_defaults(func=_cmd_worker)

    k = sub.add_parser("keys", help="make a run's CURVE keys in advance (coordinator.json, agent.json; 0600)")
    k.add_argument("--out", required=True, help="folder for coordinator.json and agent.json")
    k.set_defaults(func=_cmd_keys)

    a = sub.add_parser("agent", help="a host's agent: starts its workers, reduces their gradients (multi-host)")
    a.add_argument("--connect", default=None,
                   help="the coordinator, tcp://HOST:PORT (default: MASTER_ADDR and MASTER_PORT, as torchrun sets)")
    a.add_argument("--run", default=os.environ.get("DPTRAIN_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
                   help="the run id the coordinator printed (default: $DPTRAIN_RUN_ID or $TORCHELASTIC_RUN_ID)")
    a.add_argument("--host-index", type=int, default=None,
                   help="this host's position in the hostfile (default: from SLURM_NODEID / OMPI / DPTRAIN_RANK)")
    a.add_argument("--slots", type=int, default=1, help="workers on this host")
    a.add_argument("--keys", help="the run's agent key file (no-ssh mode)")
    a.add_argument("--keys-stdin", action="store_true", help="read the keys from stdin; exit when stdin closes (ssh)")
    a.add_argument("--wait-keys-s", type=float, default=60.0,
                   help="wait this long for --keys to appear (a file for another run is waited past, not used)")
    a.add_argument("--wait-coordinator-s", type=float, default=300.0,
                   help="retry a coordinator that is not listening yet (pods start in any order) for this long")
    a.add_argument("--stop-grace-s", type=float, default=20.0,
                   help="on SIGTERM/SIGINT, give the coordinator this long to finish its step and checkpoint (its "
                        "STOP ends the agent); a second signal stops at once; 0: stop at once")
    a.add_argument("--host-label", default=None,
                   help="name for logs (default: $SLURMD_NODENAME, else the host name, with OMPI_COMM_WORLD_RANK)")
    a.add_argument("--join", action="store_true",
                   help="take the place of a lost host in a running job (--on-worker-failure continue); "
                        "with --host-index, that one if it is lost, else any lost host with as many slots")
    a.set_defaults(func=_cmd_agent)


def _cmd_keys(args, extra) -> int:
    from .distributed.curve import make_key_files
    return make_key_files(args.out)


def _cmd_worker(args, extra) -> int:
    from .distributed.worker import run_worker
    return run_worker(args.connect, args.rank, args.run)


def _cmd_agent(args, extra) -> int:
    from .distributed.agent import AgentOptions, run_agent
    return run_agent(options_from(AgentOptions, args))


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
    add_launch_flags(la)
    la.set_defaults(func=cmd_launch)

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
    from .bench.command import add_bench_flags
    add_bench_flags(b)
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plot", help="plot a run's metrics.jsonl to PNG")
    pl.add_argument("run")
    pl.add_argument("--output", "-o", default=None)
    pl.set_defaults(func=cmd_plot)

    pn = sub.add_parser("plan", help="predict multi-host step time, traffic and scaling (a cost model)")
    from .plan.command import add_plan_flags
    add_plan_flags(pn)
    pn.set_defaults(func=cmd_plan)

    so = sub.add_parser("soak", help="long-run memory soak, or fault-injection trials, of launch (dptrain/soak/)")
    from .soak.command import add_soak_flags
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
