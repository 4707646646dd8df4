"""`dptrain soak --faults N`: N short launches, each hit by one random fault, each checked for a hang, a completed
result and leftovers.

Every trial is `dptrain launch --on-worker-failure continue --max-worker-restarts K` with a short liveness bound
(--heartbeat × --misses, 0.5 s × 4 = 2 s) for --trial-steps steps. Trial i draws from random.Random("SEED/i") (the
same draws whatever earlier trials did): the fault kind (--cycle: the kinds in turn), the step at which it strikes (20-70 % of the run) and its
victim. The kinds:

    kill   SIGKILL a random worker: it is seen dead at once and a replacement takes its rank at the next step
    stop   SIGSTOP a random worker for the liveness bound + 1.5 s, then SIGCONT: it is declared dead (silent), killed
           and replaced
    int    SIGINT the launcher: it finishes the step, writes last.npz and exits 130; the trial then runs the same
           command with --resume auto, which must finish the run
    flap   run --flap-cmd in a shell (e.g. `ip link set veth-h2 down; sleep 3; ip link set veth-h2 up`), with
           DPTRAIN_SOAK_RUN (the run id) and DPTRAIN_SOAK_LAUNCHER_PID in its environment; it must exit 0

On a cluster (--launch-args '--hostfile hosts --bind ADDR ...': the trials are multi-host launches over ssh) the
victims of `kill` are the hosts: the launcher's ssh session of a random host is killed, so its agent and workers
exit and the host is lost; the launcher starts the agent again over ssh (--join), which must take the host's place.
`stop` needs a local worker and is refused there (a stopped ssh client stops nothing on the host).

A trial passes when no launch outlived --trial-timeout (else: hang, and every process of the run is killed), the
last launch exited 0, summary.json says every step was done and metrics.jsonl has a record of each, a killed or
stopped worker was replaced, and no process or /dev/shm segment of the run (nor of the interrupted launch) is left.

TensorBoard is off in the trials unless --train.tensorboard=true (the first 20-trial soak found the coordinator's
tensorboardX import, then done as training began, holding heartbeats 1.5-4 s past a 2 s bound; it is imported before
the workers start since).
"""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from .runs import Run, completion, fail_lines, leftovers, remove_segments, run_processes, settings, step_records

KINDS = ("kill", "stop", "int", "flap")
EXIT_INTERRUPTED = 130


class _Hang(Exception):
    pass


def parse_kinds(args) -> list[str]:
    hosts = cluster(args)
    text = args.kinds or (("kill,int" if hosts else "kill,stop,int") + (",flap" if args.flap_cmd else ""))
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SystemExit(f"dptrain soak: --kinds {text!r}: each of {', '.join(KINDS)}")
    if hosts and "stop" in kinds:
        raise SystemExit("dptrain soak: the fault kind stop strikes a local worker; on a cluster use kill, int, flap")
    if "flap" in kinds and not args.flap_cmd:
        raise SystemExit("dptrain soak: the fault kind flap needs --flap-cmd")
    return kinds


def inject(kind: str, run: Run, rng: random.Random, args, deadline: float) -> tuple[str, list[str]]:
    """Strike; returns (what was hit, problems)."""
    if kind == "int":
        os.kill(run.pid, signal.SIGINT)
        return f"launcher (pid {run.pid})", []
    if kind == "flap":
        env = {**os.environ, "DPTRAIN_SOAK_RUN": run.run_id or "", "DPTRAIN_SOAK_LAUNCHER_PID": str(run.pid)}
        try:
            rc = subprocess.run(args.flap_cmd, shell=True, env=env, timeout=max(1.0, deadline - time.monotonic()),
                                stdin=subprocess.DEVNULL, capture_output=True).returncode
        except subprocess.TimeoutExpired:
            return "--flap-cmd", ["--flap-cmd did not finish within the trial's time"]
        return "--flap-cmd", [] if rc == 0 else [f"--flap-cmd exited {rc}"]
    workers = run.workers() or run.hosts()  # a cluster: the hosts' ssh sessions
    if not workers:
        return "-", ["no live worker or host to strike"]
    rank = rng.choice(sorted(workers))
    proc = workers[rank]
    try:
        if kind == "kill":
            proc.send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(args.heartbeat * args.misses + 1.5)
            try:
                proc.send_signal(signal.SIGCONT)  # normally dead by now: declared silent and killed
            except psutil.Error:
                pass
    except psutil.Error as e:
        return f"rank {rank}", [f"could not signal rank {rank}: {e}"]
    return f"{'host' if run.hosts() and not run.workers() else 'rank'} {rank} (pid {proc.pid})", []


def cluster(args) -> bool:
    """Do the trials launch across hosts (--launch-args with a hostfile or a host list)?"""
    words = shlex.split(args.launch_args or "")
    return any(w in ("--hostfile", "-H", "--hosts") or w.startswith(("--hostfile=", "--hosts=")) for w in words)


def wait_for_step(run: Run, out: Path, step: int, deadline: float) -> int | None:
    """Until metrics.jsonl holds `step` step records; the launch's exit code if it ends first."""
    while len(step_records(out)) < step:
        if not run.alive():
            return run.proc.returncode
        if time.monotonic() > deadline:
            raise _Hang
        time.sleep(0.05)
    return None


def trial(i: int, argv: list[str], total: int, root: Path, args, kinds: list[str]) -> dict:
    rng = random.Random(f"{args.seed}/{i}")
    kind, frac = rng.choice(kinds), rng.uniform(0.2, 0.7)
    if args.cycle:
        kind = kinds[i % len(kinds)]
    at = max(1, min(total - 1, round(frac * total)))
    tdir = root / f"trial-{i:03d}"
    shutil.rmtree(tdir, ignore_errors=True)
    run_out = tdir / "run"
    argv = [a for a in argv if not a.startswith("--train.out=")] + [f"--train.out={run_out}"]
    t0 = time.monotonic()
    deadline = t0 + args.trial_timeout
    row = {"trial": i, "fault": kind, "at_step": at, "target": "-", "when_s": None, "rc": [], "replaced": 0,
           "steps": None, "dropped_messages": None}
    problems, hung, runs = [], False, [Run(argv, tdir / "launch.log")]
    try:
        early = wait_for_step(runs[0], run_out, at, deadline)
        if early is not None:
            problems.append(f"the launch exited {early} before step {at}")
        else:
            row["when_s"] = round(time.monotonic() - t0, 2)
            row["target"], bad = inject(kind, runs[0], rng, args, deadline)
            problems += bad
        rc = runs[0].wait(deadline)
        if rc is None:
            raise _Hang
        row["rc"].append(rc)
        if kind == "int" and rc == EXIT_INTERRUPTED:
            if not (run_out / "last.npz").exists():
                problems.append("exit 130 without last.npz")
            runs.append(Run(argv + ["--resume", "auto"], tdir / "resume.log"))
            rc = runs[1].wait(deadline)
            if rc is None:
                raise _Hang
            row["rc"].append(rc)
        elif kind == "int" and row["when_s"] is not None:
            problems.append(f"SIGINT: the launch exited {rc}, not {EXIT_INTERRUPTED}")
        if rc != 0:
            problems.append(f"the launch exited {rc} (see {runs[-1].log_path})")
    except _Hang:
        hung = True
        problems.append(f"hang: a launch still ran after {args.trial_timeout:g} s (every process of the run killed)")
    finally:
        for r in runs:
            if r.alive():
                r.kill()
    summary, why = completion(run_out, total)
    problems += [] if hung else why
    row["steps"], row["dropped_messages"] = summary.get("steps"), summary.get("dropped_messages")
    row["replaced"] = sum(r.log().count("starting a replacement for rank") for r in runs)
    if kind in ("kill", "stop") and row["when_s"] is not None and not row["replaced"] and not hung:
        problems.append(f"{row['target']} was not replaced")
    ids = [r.run_id for r in runs]
    left = leftovers(ids, [r.pid for r in runs])
    if left:
        problems.append(f"left behind: {', '.join(left[:4])}" + (f" and {len(left) - 4} more" if len(left) > 4 else ""))
        for rid in ids:
            for p in run_processes(rid):
                try:
                    p.kill()
                except psutil.Error:
                    pass
        remove_segments(ids)
    row |= {"run_ids": ids, "seconds": round(time.monotonic() - t0, 1), "problems": problems,
            "outcome": "hang" if hung else "FAIL" if problems else "ok"}
    if not problems:
        for f in run_out.glob("*.npz"):  # a passing trial's checkpoints are not needed; its logs are kept
            f.unlink()
    return row


def describe(row: dict) -> str:
    if row["outcome"] != "ok":
        return f"{row['outcome']}: {row['problems'][0]}"
    how = {"kill": f"replaced {row['replaced']}", "stop": f"declared dead, replaced {row['replaced']}",
           "int": "exit 130, resumed" if len(row["rc"]) > 1 else "finished before the signal",
           "flap": "ridden out" if not row["replaced"] else f"replaced {row['replaced']}"}[row["fault"]]
    return f"ok: {how}, {row['steps']} steps"


def table(rows: list[dict]) -> str:
    lines = [f"{'trial':>5s}  {'fault':5s}  {'when':36s}  {'seconds':>7s}  outcome", "-" * 100]
    for r in rows:
        when = f"step {r['at_step']}" + (f" ({r['when_s']:.1f} s) {r['target']}" if r["when_s"] is not None else "")
        lines.append(f"{r['trial']:>5d}  {r['fault']:5s}  {when:36s}  {r['seconds']:>7.1f}  {describe(r)}")
    return "\n".join(lines)


def run_faults(args, extra: list[str]) -> int:
    kinds = parse_kinds(args)
    root = Path(args.out or "soak-faults")
    more = {"dist.on_worker_failure": "continue", "dist.max_worker_restarts": args.max_worker_restarts,
            "dist.heartbeat_interval_s": args.heartbeat, "dist.heartbeat_misses": args.misses,
            "train.tensorboard": "false"}  # see the module's docstring
    argv, total, _ = settings(args, extra, root / "trial", args.trial_steps, more)
    print(f"dptrain soak: {args.faults} fault trial(s) of {total} steps, {args.workers} workers, kinds "
          f"{','.join(kinds)}, seed {args.seed}, liveness bound {args.heartbeat * args.misses:g} s", flush=True)
    rows, t0 = [], time.monotonic()
    for i in range(args.faults):
        row = trial(i, argv, total, root, args, kinds)
        rows.append(row)
        if not args.no_progress:
            print(f"[{i + 1}/{args.faults}] {row['fault']:5s} at step {row['at_step']:>4d} -> {describe(row)} "
                  f"({row['seconds']:.1f} s)", flush=True)
    failed = [r for r in rows if r["outcome"] != "ok"]
    report = {"trials": rows, "passed": len(rows) - len(failed), "failed": len(failed),
              "wall_s": round(time.monotonic() - t0, 1),
              "settings": {"faults": args.faults, "kinds": kinds, "seed": args.seed, "steps": total,
                           "workers": args.workers, "max_worker_restarts": args.max_worker_restarts,
                           "liveness_bound_s": args.heartbeat * args.misses, "trial_timeout_s": args.trial_timeout,
                           "flap_cmd": args.flap_cmd, "launch": argv}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "faults.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    by_kind = {k: sum(1 for r in rows if r["fault"] == k) for k in kinds}
    print(f"{report['passed']}/{len(rows)} trials passed ({', '.join(f'{k} {n}' for k, n in by_kind.items())}) "
          f"in {report['wall_s']:.0f} s; {root / 'faults.json'}")
    return fail_lines([f"trial {r['trial']} ({r['fault']}): {'; '.join(r['problems'])}" for r in failed],
                      f"{args.faults} fault trial(s)")
