"""Helpers for the one-host distributed tests: tiny configs, launches in a subprocess with a hard timeout, and
finding what a run left behind (worker processes, /dev/shm/dptrain_* segments).

Every subprocess launch here runs in its own session, so a timeout kills the whole process group (the launcher
and any worker it started) and nothing outlives a failed test.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from helpers import TINY_TOML, make_config

from dptrain import checkpoint, config as config_mod
from dptrain.data.shm import leftover_segments

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_TOML


def tiny_values(data: Path, out: Path, **extra) -> dict:
    """`section.key -> value` for the tiny model on the session's dataset; `extra` uses section__key names."""
    # TensorBoard off: importing tensorboardX costs ~1.5 s a process (test_train.py checks the events)
    return {"data.path": data, "data.cache_dir": data.parent / "cache", "data.min_images_per_class": 10,
            "train.out": out, "train.progress": False, "train.patience": 0, "train.tensorboard": False} | {
        k.replace("__", "."): v for k, v in extra.items()}


def tiny_cfg(data: Path, out: Path, **extra) -> config_mod.Config:
    return make_config(tiny_values(data, out, **extra), toml=TINY)


def cli_args(data: Path, out: Path, **extra) -> list[str]:
    return ["--config", str(TINY)] + [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                                      for k, v in tiny_values(data, out, **extra).items()]


def launch_inproc(cfg: config_mod.Config, resume: bool = False, stop_at_step: int = 0) -> int:
    """`launch_local` in this process; afterwards no worker child may be left (any that is gets killed, and fails)."""
    from dptrain.distributed import versions
    from dptrain.launcher.local import launch_local
    versions.code_hash.cache_clear()  # other sessions edit dptrain while the suite runs: hash the code as it is now
    try:
        return launch_local(cfg, resume=resume, stop_at_step=stop_at_step)
    finally:
        left = [p for p in psutil.Process().children(recursive=True) if "worker" in " ".join(_cmdline(p))]
        for p in left:
            p.kill()
        assert not left, f"workers left behind: {[p.pid for p in left]}"


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def params(run: Path, name: str = "last") -> np.ndarray:
    arrays, _ = checkpoint.load(Path(run) / f"{name}.npz")
    return arrays["params"]


def arrays(run: Path, name: str = "last") -> dict:
    return checkpoint.load(Path(run) / f"{name}.npz")[0]


def metrics(run: Path) -> list[dict]:
    import json
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_records(run: Path) -> list[dict]:
    return [m for m in metrics(run) if "loss" in m and "step" in m]


# ---- launches in a subprocess ------------------------------------------------------------------------------------
class Proc:
    """A `python -m dptrain ...` (or any argv) in its own session, output to a log file polled by `wait_log`;
    `close()` kills its whole process group (idempotent)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, netns: str | None = None):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout_s: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                m = re.search(pattern, self.log())
                if m:
                    return m
                raise AssertionError(f"no {pattern!r} (rc {self.proc.poll()}) after {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"still running after {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Launch(Proc):
    """`python -m dptrain launch ...`; closing also reaps its workers (own sessions) and shared memory."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        super().__init__([sys.executable, "-m", "dptrain", "launch", *args], log_path, env)

    def run_id(self) -> str:
        return self.wait_log(r"\(run ([0-9a-f]+)\)").group(1)

    def endpoint(self) -> str:
        """Where the coordinator listens (ipc:// in the user's private run directory, one host)."""
        return self.wait_log(r"coordinator listening on (\S+) ").group(1)

    def kill(self) -> None:
        """SIGKILL the launcher's whole process group (workers are in their own sessions: those by pid)."""
        kill_workers_of(self.run_id_or_none())
        super().kill()

    def run_id_or_none(self) -> str | None:
        m = re.search(r"\(run ([0-9a-f]+)\)", self.log())
        return m.group(1) if m else None

    def close(self) -> None:
        """Reap everything this launch may have left (idempotent), then close the log."""
        if self.proc.poll() is None:
            self.kill()
        rid = self.run_id_or_none()
        if rid:
            kill_workers_of(rid)
            for name in leftover_segments(rid):
                try:
                    os.unlink(f"/dev/shm/{name}")
                except FileNotFoundError:
                    pass
        self._log.close()


def run_launch(args: list[str], log_path: Path, timeout_s: float = 120.0) -> tuple[int, str]:
    with Launch(args, log_path) as la:
        rc = la.wait(timeout_s)
        return rc, la.log()


# ---- what a run leaves behind -------------------------------------------------------------------------------------
def workers_of(run_id: str | None) -> list[psutil.Process]:
    """Live `dptrain worker --run RUN_ID` processes (zombies excluded)."""
    from dptrain.soak.runs import run_processes
    out = []
    for p in run_processes(run_id):
        try:
            if "worker" in p.info["cmdline"] and "--run" in p.info["cmdline"]:
                out.append(p)
        except (psutil.Error, TypeError):
            continue
    return out


def kill_workers_of(run_id: str | None) -> None:
    for p in workers_of(run_id):
        try:
            p.kill()
        except psutil.Error:
            pass


def worker_pid(run: Path, rank: int, timeout_s: float = 30.0) -> int:
    """The pid a worker wrote in the first line of RUN/logs/rank<R>.log ("ready: pid N ...")."""
    path = Path(run) / "logs" / f"rank{rank}.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            m = re.search(r"pid (\d+)", path.read_text(errors="replace"))
            if m:
                return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no pid in {path} after {timeout_s} s")


def wait_until(pred, timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return bool(pred())


def wait_steps(run: Path, n: int, timeout_s: float = 60.0, launch: Launch | None = None) -> None:
    """Until metrics.jsonl has n step records; fails at once (with its log) if `launch` exits first."""
    def done() -> bool:
        if launch is not None and launch.proc.poll() is not None and len(step_records(run)) < n:
            raise AssertionError(f"launcher exited ({launch.proc.returncode}) before step {n}:\n{launch.log()}")
        return len(step_records(run)) >= n
    assert wait_until(done, timeout_s), f"fewer than {n} steps in {run}" + (f":\n{launch.log()}" if launch else "")


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def flood(socks: list, msgs: list, stop, sent: list, got: list) -> None:
    """An intruder's loop: every message on every socket (without blocking: a DEALER whose handshake never
    completes queues a few, then refuses), and whatever comes back into `got`, until `stop` is set; then the
    sockets are closed. sent[0] counts the attempts."""
    import zmq
    while not stop.is_set():
        for s in socks:
            for m in msgs:
                sent[0] += 1
                try:
                    s.send_multipart(m, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            while s.poll(10):
                got.append(s.recv_multipart())
    for s in socks:
        s.close(0)
