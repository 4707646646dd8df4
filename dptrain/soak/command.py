"""`dptrain soak`: long and hostile runs to do before trusting a machine or a cluster (issue 11, "Long runs").

    dptrain soak --steps 2000 --workers 4 [--image-size 32] [--batch-size 32] [--out soak-out] [--section.key=value]
        memory soak (memory.py): one `python -m dptrain launch` of exactly STEPS steps in a subprocess; every
        --interval s the launcher and every worker are sampled (psutil: USS and PSS from memory_full_info, open fds,
        threads) with the count and bytes of the run's /dev/shm segments. Checks, each a one-line reason when it
        fails: the run finished every step; USS and PSS of every process grew by at most --max-growth % (median of
        the last 10 % of the samples after warm-up against the first 10 %; growth under --slack-mb is noise); open
        fds and shared-memory segments stayed constant; the coordinator dropped no message; nothing of the run is
        left afterwards. Writes soak.json and soak.png (memory over time per process) into --out.
    dptrain soak --faults N [--kinds kill,stop,int] [--flap-cmd CMD] [--seed S] [--trial-steps 60]
        fault-injection soak (faults.py): N short runs under `--on-worker-failure continue
        --max-worker-restarts K`, each hit at a seeded random step by one fault: kill -9 of a random worker, SIGSTOP of
        one for longer than the liveness bound (then SIGCONT), SIGINT of the launcher (exit 130, then the trial goes on
        with `--resume auto`), or the user's --flap-cmd (e.g. a link down for a few seconds). Each trial must not hang
        (hard timeout, every process of the run killed), must finish every step, and must leave no process and no
        shared memory behind. A line per trial, a table, faults.json.

The data is the built-in synthetic face set (rendered once into ~/.cache/dptrain/bench, like `dptrain bench`) unless
--data names one; `--config` and `--section.key=value` overrides reach the launches unchanged (they win over the
soak's own settings). Exit status: 0 every check passed, 1 one failed (its reason on stderr).
"""
from __future__ import annotations

import argparse

from .faults import run_faults
from .memory import run_memory_soak


def add_soak_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=2000, help="memory soak: training steps of the one run")
    p.add_argument("--workers", type=int, default=4, help="worker processes of every run")
    p.add_argument("--image-size", type=int, default=32, help="data.image_size (default 32: 2000 steps fit ~10 min "
                   "on 2 cores)")
    p.add_argument("--batch-size", type=int, default=32, help="train.batch_size, global")
    p.add_argument("--config", default=None, help="TOML config the launches start from")
    p.add_argument("--data", default=None, help="dataset folder or .tgz (default: the built-in synthetic set)")
    p.add_argument("--images", type=int, default=2000, help="size of the built-in synthetic set")
    p.add_argument("--classes", type=int, default=62, help="classes of the built-in synthetic set")
    p.add_argument("--out", default=None, help="folder for soak.json + soak.png or faults.json and the runs "
                   "(default soak-out, or soak-faults with --faults)")
    m = p.add_argument_group("memory soak")
    m.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    m.add_argument("--warmup", type=float, default=0.2, help="fraction of the training time not judged")
    m.add_argument("--max-growth", type=float, default=5.0, help="USS/PSS growth after warm-up that fails, in %%")
    m.add_argument("--slack-mb", type=float, default=2.0, help="growth below this many MiB is noise, whatever %%")
    m.add_argument("--timeout", type=float, default=3600.0, help="hard limit on the run, seconds")
    f = p.add_argument_group("fault-injection soak")
    f.add_argument("--faults", type=int, default=0, metavar="N", help="run N fault trials instead")
    f.add_argument("--kinds", default=None, help="faults to draw from: kill,stop,int (and flap with --flap-cmd)")
    f.add_argument("--flap-cmd", default=None, metavar="CMD",
                   help="shell command run during a trial as fault kind 'flap' (e.g. a veth down for 3 s, then up); "
                        "it sees DPTRAIN_SOAK_RUN and DPTRAIN_SOAK_LAUNCHER_PID")
    f.add_argument("--cycle", action="store_true", help="trial i gets kind i mod len(--kinds), not a draw")
    f.add_argument("--seed", type=int, default=0, help="draws of fault, victim and moment (reproducible)")
    f.add_argument("--trial-steps", type=int, default=60, help="training steps of each trial")
    f.add_argument("--max-worker-restarts", type=int, default=3, help="replacements a trial may start")
    f.add_argument("--heartbeat", type=float, default=0.5, help="dist.heartbeat_interval_s of the trials")
    f.add_argument("--misses", type=int, default=4, help="dist.heartbeat_misses of the trials")
    f.add_argument("--trial-timeout", type=float, default=180.0, help="a trial still running after this hangs")
    f.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--launch-args", default=None, metavar="ARGS",
                   help="more arguments for every launch, one string: e.g. '--hostfile hosts --bind 10.0.0.1' to "
                        "soak a cluster")


def main(args: argparse.Namespace, extra: list[str]) -> int:
    if args.faults:
        return run_faults(args, extra)
    return run_memory_soak(args, extra)
