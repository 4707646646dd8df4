"""`dptrain launch`'s options beyond the Config, made from the command line's arguments at its edge."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchOptions:
    """What `dptrain launch` needs beyond the Config (flags.add_launch_flags): how this start relates to earlier
    ones, and where the hosts are and how to reach them. Made from the command line's arguments at its edge."""
    resume: str | None = None  # "yes" / "auto" (--resume); None: a fresh run
    stop_at_step: int = 0
    hostfile: str | None = None
    hosts: str | None = None  # -H a:2,b:2
    include: str | None = None
    exclude: str | None = None
    ssh_port: int | None = None
    ssh_identity: str | None = None
    ssh_config: str | None = None
    no_ssh: bool = False  # print each host's `dptrain agent` command and wait for them
    remote_python: str | None = None
    wait_agents_s: float = 120.0
    export: list[str] | None = None  # -x NAME[=VALUE]
    tee: int | None = None
    max_restarts: int = 0
    keys: str | None = None  # the coordinator's key file made by `dptrain keys`
    run_id: str | None = None
    np: int | None = None  # -np N: the total number of workers over the hosts (mpirun's, horovodrun's meaning)
    workers: int | None = None  # --workers / --nproc-per-node as given (per host with -H or a hostfile)

    @property
    def many_hosts(self) -> bool:
        return bool(self.hostfile or self.hosts or self.no_ssh)
