"""The coordinator's record of one peer (a worker rank, or a host's agent) and how a lost one is described.

Peer states:
    STARTING --HELLO ok--> WELCOMED --READY--> READY --(process exit | silent | stuck | ERROR)--> DEAD
    (any) --STOP sent--> STOPPED
    DEAD --replacement started or an agent's HELLO with join--> a fresh STARTING record of the rank
"""
from __future__ import annotations

import enum
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


class PeerState(enum.Enum):
    STARTING = "starting"
    WELCOMED = "welcomed"
    READY = "ready"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass
class Peer:
    rank: int
    host: str = "?"
    pid: int = 0
    identity: bytes | None = None
    proc: object = None  # subprocess.Popen when this process started it
    log_path: Path | None = None
    state: PeerState = PeerState.STARTING
    last_seen: float = field(default_factory=time.monotonic)
    weights_version: int = -1  # socket transport: the last weights this rank received
    slots: int = 1  # worker ranks behind this peer: 1 for a worker, the host's slots for an agent
    mesh_endpoint: str = ""  # an agent on the mesh plane: where the other agents reach it, and its public key
    mesh_key: str = ""
    mesh_factor: tuple = ()  # an agent whose workers leave the factored Linear's factors: (w0, K, F) of it
    mesh_gemm: str = ""  # an agent's nn.threads.gemm_signature: equal ones compute equal GEMM bits
    death: str = ""
    rss_mb: float = 0.0  # resident memory at the last sample (processes this coordinator started)
    rss_at: float = 0.0
    log_tail: deque = field(default_factory=lambda: deque(maxlen=20))
    replacement: bool = False  # started (or joined) in place of a lost peer of this rank
    given_up: bool = False  # lost, and not to be replaced (no restart left)
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"

    def last_lines(self, n: int = 10) -> list[str]:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        return list(self.log_tail)[-n:]


def killed_how(peer: Peer, code: int) -> str:
    """What a SIGKILL most likely was: the kernel's OOM killer when its log says so (readable as root), else said
    as a possibility, with the memory the process had at its last sample."""
    if code != -signal.SIGKILL:
        return ""
    had = f"{peer.rss_mb:,.0f} MB resident at its last sample" if peer.rss_mb else "its memory unknown"
    if oom_killed(peer.pid):
        return f" (SIGKILL by the kernel's OOM killer, kernel log; {had})"
    return f" (SIGKILL: the kernel's OOM killer or a kill -9; {had})"


def oom_killed(pid: int) -> bool:
    """Does the kernel log (/dev/kmsg, root only) say the OOM killer killed `pid`?"""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except OSError:  # EPIPE: records overwritten while reading; go on
                continue
            if not rec:
                return False
            if b"Killed process %d " % pid in rec or b"Killed process %d (" % pid in rec:
                return True
    finally:
        os.close(fd)
