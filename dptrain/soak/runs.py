"""What both soaks share: the launch runs they start and watch (Run), their settings, and the checks of what a
run leaves behind (processes, shared memory, completed steps)."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .. import config as config_mod, log
from ..bench.workers import synth_dataset
from ..data.dataset import load_dataset
from ..data.shm import leftover_segments
from ..flags import parse_overrides


def fail_lines(failures: list[str], what: str) -> int:
    for line in failures:
        print(f"dptrain soak: FAIL: {line}", file=sys.stderr)
    print(f"dptrain soak: {what}: " + (f"{len(failures)} check(s) failed" if failures else "every check passed"),
          file=sys.stderr)
    return 1 if failures else 0


# ---- the launches' settings -------------------------------------------------------------------------------------
def plan_epochs(steps: int, per_epoch: int) -> tuple[int, int]:
    """(epochs, steps_per_epoch) whose product is `steps`, each epoch at most `per_epoch` steps (the data's)."""
    if per_epoch < 1:
        raise SystemExit("dptrain soak: the data set holds less than one global batch of training images")
    first = math.ceil(steps / per_epoch)
    for e in range(first, min(steps, 4 * first + 64) + 1):
        if steps % e == 0:
            return e, steps // e
    return first, math.ceil(steps / first)  # no exact split: a few steps more than asked


def settings(args, extra: list[str], out: Path, steps: int, more: dict | None = None) -> tuple[list[str], int, int]:
    """The launch's arguments (after `launch`) for `steps` steps into `out`, the number of steps it will run and
    the steps of one epoch.
    The dataset is loaded here once (it fills the decode cache, and its split says how many batches an epoch has)."""
    user = parse_overrides(extra)
    ours = {"dist.workers": args.workers, "data.image_size": args.image_size, "train.batch_size": args.batch_size,
            "train.patience": 0, "train.progress": "false", "train.out": out, **(more or {})}
    if "data.path" not in user:
        if args.data:
            ours["data.path"] = args.data
        else:
            size = int(user.get("data.image_size", args.image_size))
            ours["data.path"] = synth_dataset(args.images, size, args.classes, None, progress=False)
    values = {k: str(v) for k, v in {**ours, **user, "train.out": out}.items()}  # the soak watches `out`
    try:
        cfg = config_mod.load(args.config, values)
        ds = load_dataset(cfg.data, cfg.train.seed, progress=False)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dptrain soak: {e}") from None
    per_epoch = len(ds.train_idx) // cfg.train.batch_size
    del ds
    epochs, spe = plan_epochs(steps, per_epoch)
    values = {"train.epochs": str(epochs), "train.steps_per_epoch": str(spe), **values}
    cfg = config_mod.load(args.config, values)
    spe = min(cfg.train.steps_per_epoch or per_epoch, per_epoch)
    argv = (["--config", args.config] if args.config else []) + [f"--{k}={v}" for k, v in values.items()]
    return argv + shlex.split(args.launch_args or ""), cfg.train.epochs * spe, spe


# ---- one launch in a subprocess ----------------------------------------------------------------------------------
RUN_ID = re.compile(r"\(run ([A-Za-z0-9_-]+)\)")


class Run:
    """`python -m dptrain launch ARGS` in its own session, its output in `log_path`."""

    def __init__(self, argv: list[str], log_path: Path):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "dptrain", "launch", *argv], stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self._run_id = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def run_id(self) -> str | None:
        if self._run_id is None:
            m = RUN_ID.search(self.log())
            self._run_id = m.group(1) if m else None
        return self._run_id

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _children(self, index_of) -> dict[int, psutil.Process]:
        """index -> live child process of the launcher for which index_of(cmdline) gives an index (else None)."""
        out = {}
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.Error:
            return out
        for p in kids:
            try:
                index = index_of(p.cmdline())
                if index is not None and p.status() != psutil.STATUS_ZOMBIE:
                    out[index] = p
            except (psutil.Error, ValueError, IndexError):
                continue
        return out

    def workers(self) -> dict[int, psutil.Process]:
        """rank -> live worker process the launcher started (its children with `dptrain worker` in the cmdline)."""
        return self._children(lambda cmd: int(cmd[cmd.index("--rank") + 1])
                              if "worker" in cmd and "--rank" in cmd else None)

    def hosts(self) -> dict[int, psutil.Process]:
        """host index -> live ssh session of that host's agent, started by the launcher (multi-host launches)."""
        def host_index(cmd):
            line = " ".join(cmd)
            ssh = cmd and cmd[0].endswith("ssh") and " agent " in line
            return int(line.split("--host-index ", 1)[1].split()[0]) if ssh else None
        return self._children(host_index)

    def wait(self, deadline: float) -> int | None:
        """The exit code, or None when still running at `deadline` (time.monotonic())."""
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the launcher's process group and every process of its run (workers have their own sessions)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in run_processes(self.run_id):
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()


def run_processes(run_id: str | None) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose command line names the run id: its workers and agents."""
    if not run_id:
        return []
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.pid != os.getpid() and run_id in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, TypeError):
            continue
    return out


def shm_usage(run_id: str | None) -> tuple[int, int]:
    """(count, bytes) of the run's /dev/shm segments."""
    names = leftover_segments(run_id) if run_id else []
    total = 0
    for n in names:
        try:
            total += os.stat(f"/dev/shm/{n}").st_size
        except OSError:
            pass
    return len(names), total


def leftovers(run_ids: list[str | None], launcher_pids: list[int], wait_s: float = 5.0) -> list[str]:
    """What the runs left: live processes and /dev/shm segments (after up to wait_s for them to go)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [f"pid {p.pid} ({' '.join(p.info['cmdline'][2:5])})" for rid in run_ids for p in run_processes(rid)]
        left += [f"launcher pid {pid}" for pid in launcher_pids if _alive(pid)]
        left += [f"/dev/shm/{n}" for rid in run_ids if rid for n in leftover_segments(rid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_segments(run_ids: list[str | None]) -> None:
    for rid in run_ids:
        for n in leftover_segments(rid) if rid else []:
            try:
                os.unlink(f"/dev/shm/{n}")
            except OSError:
                pass


# ---- what a run recorded -----------------------------------------------------------------------------------------
def step_records(out: Path) -> list[int]:
    steps = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return steps
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a partial last line while the run writes
        if "loss" in rec and "step" in rec:
            steps.append(rec["step"])
    return steps


def completion(out: Path, total: int) -> tuple[dict, list[str]]:
    """The run's summary.json and why it is not a completed run of `total` steps (empty: it is)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}, [f"{out / 'summary.json'}: missing or unreadable"]
    why = []
    if summary.get("steps") != total or summary.get("interrupted"):
        why.append(f"summary.json: {summary.get('steps')} of {total} steps"
                   + (" (interrupted)" if summary.get("interrupted") else ""))
    missing = sorted(set(range(total)) - set(step_records(out)))
    if missing:
        why.append(f"metrics.jsonl: no record of {len(missing)} step(s), first {missing[:5]}")
    return summary, why


def progress(text: str, enabled: bool = True) -> None:
    if enabled:
        log.get().info(text)
