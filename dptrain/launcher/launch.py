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
from .options import LaunchOptions
from .run import EXIT_WORKER_LOST


def launch(cfg: Config, opts: LaunchOptions) -> int:
    args = opts
    if cfg.dist.workers == 0 and not args.many_hosts:  # the single-process fallback: the same math, no sockets
        summary = run_local(cfg, args.resume, args.stop_at_step, command="launch")
        print(json.dumps(summary))
        return exit_code(summary)
    lg = log.get()
    try:  # a host name: ZeroMQ binds addresses and interfaces only
        cfg.dist.bind = bind_address(cfg.dist.bind)
    except HostfileError as e:
        raise SystemExit(f"dptrain launch: {e}") from None
    limit = args.max_restarts
    if limit and args.no_ssh:
        raise SystemExit("dptrain launch: --max-restarts needs agents this launcher starts (not --no-ssh)")
    if args.many_hosts and cfg.dist.plane == "mesh" and cfg.train.ema_epochs > 0:
        raise SystemExit(f"dptrain launch: train.ema_epochs = {cfg.train.ema_epochs} averages every step's weights "
                         f"at the coordinator, which the mesh data plane sends it only every dist.sync_every steps: "
                         f"add --train.ema_epochs=0, or --plane star")
    restarts = 0
    while True:
        progress = {"restarts": restarts}
        if args.many_hosts:
            rc = launch_hosts(cfg, args, progress)
        else:
            rc = launch_local(cfg, resume=args.resume, stop_at_step=args.stop_at_step, progress=progress,
                              tee=args.tee)
        if rc != EXIT_WORKER_LOST or restarts >= limit:
            return rc
        if not progress.get("steps"):  # a run that cannot take a step fails; it does not loop
            lg.error(f"not restarting: no step succeeded since the last start (restart {restarts} of {limit})")
            return rc
        restarts += 1
        args.resume = "auto"
        lg.warning(f"restart {restarts} of {limit} (--max-restarts): starting again from last.npz")


