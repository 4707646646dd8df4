"""`dptrain launch`: one host's workers (local.py) or many hosts' agents (hosts.py), started again from the last
checkpoint when a worker or host is lost and --max-restarts allows it.
"""
from __future__ import annotations

import json

from .. import log
from ..config import Config
from ..distributed.hostfile import HostfileError, bind_address
from ..train import exit_code, run_local
from .hosts import launch_hosts
from .local import launch_local
from .run import EXIT_WORKER_LOST


def _many_hosts(args) -> bool:
    return bool(getattr(args, "hostfile", None) or getattr(args, "hosts", None) or getattr(args, "no_ssh", False))


def launch(cfg: Config, args) -> int:
    if cfg.dist.workers == 0 and not _many_hosts(args):  # the single-process fallback: the same math, no sockets
        summary = run_local(cfg, args.resume, args.stop_at_step, command="launch")
        print(json.dumps(summary))
        return exit_code(summary)
    lg = log.get()
    try:  # a host name: ZeroMQ binds addresses and interfaces only
        cfg.dist.bind = bind_address(cfg.dist.bind)
    except HostfileError as e:
        raise SystemExit(f"dptrain launch: {e}") from None
    limit = getattr(args, "max_restarts", 0) or 0
    if limit and getattr(args, "no_ssh", False):
        raise SystemExit("dptrain launch: --max-restarts needs agents this launcher starts (not --no-ssh)")
    if _many_hosts(args) and cfg.dist.plane == "mesh" and cfg.train.ema_epochs > 0:
        raise SystemExit(f"dptrain launch: train.ema_epochs = {cfg.train.ema_epochs} averages every step's weights "
                         f"at the coordinator, which the mesh data plane sends it only every dist.sync_every steps: "
                         f"add --train.ema_epochs=0, or --plane star")
    restarts = 0
    while True:
        progress = {"restarts": restarts}
        if _many_hosts(args):
            rc = launch_hosts(cfg, args, progress)
        else:
            rc = launch_local(cfg, resume=args.resume, stop_at_step=args.stop_at_step, progress=progress,
                              tee=getattr(args, "tee", None))
        if rc != EXIT_WORKER_LOST or restarts >= limit:
            return rc
        if not progress.get("steps"):  # a run that cannot take a step fails; it does not loop
            lg.error(f"not restarting: no step succeeded since the last start (restart {restarts} of {limit})")
            return rc
        restarts += 1
        args.resume = "auto"
        lg.warning(f"restart {restarts} of {limit} (--max-restarts): starting again from last.npz")


