"""The command line's flag table and the parsing of arguments into a Config, shared by every command and tool.

Short flags are aliases of config keys (`--lr` is `--train.lr`); any key can be set as `--section.key=value`;
`--config FILE.toml` sets many at once. Precedence: defaults < --config < flags. Nothing here starts anything: the
commands (cli.py) and the tools (bench/, plan/, soak/) read their arguments through it.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from . import config as config_mod
from .distributed.session import physical_cores


def worker_count(text: str) -> int:
    """--workers N, or `auto`: one worker per physical core."""
    if text.strip().lower() == "auto":
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


# torchrun's spellings of the per-host count, typed out of habit (mpirun's and horovodrun's -np is a total across
# hosts: a flag of its own, add_launch_flags)
FLAG_ALIASES = {"--workers": ("--nproc-per-node", "--nproc_per_node")}


def dest(flag: str) -> str:
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
        v = getattr(args, dest(flag), None)
        if v is not None:
            overrides[key] = str(v)
    total = getattr(args, "np", None)
    if total is not None and not (getattr(args, "hostfile", None) or getattr(args, "hosts", None)):
        if total < 1:
            raise SystemExit(f"dptrain launch: -np {total}: the number of workers must be at least 1")
        workers = getattr(args, "workers", None)
        if workers is not None and workers != total:  # on one host both count the same workers
            raise SystemExit(f"dptrain launch: -np {total} and --workers {workers} disagree: give one of them")
        overrides["dist.workers"] = str(total)
    overrides.update(parse_overrides(extra))
    base = args.config
    out = overrides.get("train.out")
    if args.resume and not base and out and (Path(out) / "config.toml").exists():
        base = str(Path(out) / "config.toml")  # a resumed run keeps its own config unless told otherwise
    try:
        return config_mod.load(base, overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain: config error: {e}") from None


def options_from(cls, args: argparse.Namespace):
    """The options dataclass `cls` (LaunchOptions, AgentOptions) from the arguments: each field the parser gave a
    value; the rest keep their defaults. The command line's edge: nothing below it sees the Namespace."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if getattr(args, f.name, None) is not None})


def run_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1-64 of [A-Za-z0-9_-] (it names shared memory)")
    return text


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("many hosts")
    h.add_argument("-np", dest="np", type=int, default=None, metavar="N",
                   help="workers in all, as in mpirun and horovodrun: with -H/--hostfile the hosts' slots are filled "
                        "in order up to N (more than the slots is an error); on one host the same as --workers N")
    h.add_argument("--hostfile", help="lines of `host slots=N` (OpenMPI/Horovod/DeepSpeed format)")
    h.add_argument("-H", "--hosts", help="host list like a:2,b:2")
    h.add_argument("--include", help="only these hosts/slots (DeepSpeed syntax: a@b:0,1)")
    h.add_argument("--exclude", help="not these hosts/slots")
    h.add_argument("--ssh-port", type=int, default=None)
    h.add_argument("--ssh-identity", default=None)
    h.add_argument("--ssh-config", default=None, help="ssh -F file")
    h.add_argument("--no-ssh", action="store_true",
                   help="print the `dptrain agent` command each host must run, and wait for them")
    h.add_argument("--remote-python", default=None, help="python on the hosts (default: this one's path)")
    h.add_argument("--wait-agents-s", type=float, default=120.0, help="how long to wait for every host's READY")
    h.add_argument("-x", dest="export", action="append", metavar="NAME[=VALUE]",
                   help="forward an environment variable to the hosts (mpirun's -x; NAME alone: this value); "
                        "also ./.dptrain_env (NAME=VALUE lines) and OMP_*, OPENBLAS_*, MKL_*, NPY_* set here")
    h.add_argument("--tee", type=int, default=None, metavar="RANK",
                   help="also show this worker rank's log lines on the console (one host; each rank's full log "
                        "is in RUN/logs/)")
    h.add_argument("--max-restarts", type=int, default=0,
                   help="when a worker or host is lost under --on-worker-failure abort, start the run again from "
                        "last.npz, at most this many times over the run (only after a step succeeded)")
    h.add_argument("--keys", default=None,
                   help="the run's CURVE keys made in advance with `dptrain keys` (coordinator.json); default: "
                        "made now, agents get theirs over ssh or from RUN/agent-keys.json")
    h.add_argument("--run-id", default=None, type=run_id,
                   help="fix the run id in advance (e.g. $SLURM_JOB_ID) so agents can be started with it; "
                        "default: random")


