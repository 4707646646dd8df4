"""Rank discovery from the environment, for launches where dptrain does not ssh.

When a scheduler or MPI starts one dptrain process per rank, the rank comes from
its environment. Sources, first match wins:

    source   rank                  world_size             local_rank                   node_rank
    dptrain  DPTRAIN_RANK          DPTRAIN_WORLD_SIZE     DPTRAIN_LOCAL_RANK (dflt 0)  DPTRAIN_NODE_RANK
    openmpi  OMPI_COMM_WORLD_RANK  OMPI_COMM_WORLD_SIZE   OMPI_COMM_WORLD_LOCAL_RANK   OMPI_COMM_WORLD_NODE_RANK
    slurm    SLURM_PROCID          SLURM_NTASKS           SLURM_LOCALID                SLURM_NODEID
    torchrun RANK                  WORLD_SIZE             LOCAL_RANK (dflt 0)          GROUP_RANK
             (torchrun, Kubeflow's PyTorchJob, a Kubernetes Indexed Job that sets them: the generic names come last)

`DPTRAIN_*` comes first so a user can override what a scheduler set. OpenMPI comes
before Slurm because ``mpirun`` inside a Slurm allocation inherits the batch step's
``SLURM_PROCID=0`` while its own ``OMPI_*`` variables are the per-process truth.
Run under ``srun`` (not straight from the sbatch script, where every process would
see ``SLURM_PROCID=0``). Node lists (``SLURM_JOB_NODELIST``) are not read: the
coordinator address is given with ``--connect``. Set ``DPTRAIN_LOCAL_RANK`` when
several ranks share a host; it defaults to 0 because the plain source has no
scheduler to ask.

A source is used when its rank variable is set. Then its world size must be set too
(Slurm/OpenMPI also need their local rank), every variable must be a non-negative
integer, ``rank < world_size``, ``local_rank <= rank`` and, when the local size is
known (``OMPI_COMM_WORLD_LOCAL_SIZE``, ``DPTRAIN_LOCAL_WORLD_SIZE``),
``local_rank < local_world_size``. A violation raises `RankEnvError` naming the
variable. A plain source's size variable without its rank is also an error (a
half-done export); a lone ``SLURM_NTASKS`` (as in ``salloc``) is not.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


class RankEnvError(ValueError):
    """The environment names a rank, but inconsistently; the message names the variable."""


@dataclass(frozen=True)
class RankEnv:
    rank: int                            # global rank, 0..world_size-1
    world_size: int                      # number of ranks in the run
    local_rank: int                      # rank among the processes on this host
    source: str                          # "dptrain", "openmpi" or "slurm"
    node_rank: int | None = None         # index of this host, when the source says
    local_world_size: int | None = None  # processes on this host, when the source says


@dataclass(frozen=True)
class _Source:
    name: str
    rank: str
    world_size: str
    local_rank: str
    node_rank: str
    local_world_size: str | None
    local_rank_required: bool
    size_without_rank_is_error: bool


SOURCES = (
    _Source("dptrain", "DPTRAIN_RANK", "DPTRAIN_WORLD_SIZE", "DPTRAIN_LOCAL_RANK", "DPTRAIN_NODE_RANK",
            "DPTRAIN_LOCAL_WORLD_SIZE", local_rank_required=False, size_without_rank_is_error=True),
    _Source("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_NODE_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", local_rank_required=True,
            size_without_rank_is_error=True),
    _Source("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", None,
            local_rank_required=True, size_without_rank_is_error=False),
    _Source("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
            local_rank_required=False, size_without_rank_is_error=False),
)


def coordinator_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """torchrun's / PyTorchJob's MASTER_ADDR + MASTER_PORT as the coordinator's endpoint (None: not set)."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
    if not addr and not port:
        return None
    if not addr or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise RankEnvError(f"MASTER_ADDR={addr!r} MASTER_PORT={port!r}: need a host and a port 1..65535")
    return f"tcp://{addr}:{port}"


def _int(env: Mapping[str, str], var: str, required: bool) -> int | None:
    if var not in env:
        if required:
            raise RankEnvError(f"{var} is not set")
        return None
    text = env[var].strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise RankEnvError(f"{var}={env[var]!r} is not a non-negative integer")
    return int(text)


def _from_source(src: _Source, env: Mapping[str, str]) -> RankEnv:
    rank = _int(env, src.rank, True)
    world_size = _int(env, src.world_size, True)
    local_rank = _int(env, src.local_rank, src.local_rank_required)
    node_rank = _int(env, src.node_rank, False)
    local_size = _int(env, src.local_world_size, False) if src.local_world_size else None
    if world_size < 1:
        raise RankEnvError(f"{src.world_size}={world_size} must be at least 1")
    if rank >= world_size:
        raise RankEnvError(f"{src.rank}={rank} is not below {src.world_size}={world_size}")
    if local_rank is None:
        local_rank = 0
    elif local_rank > rank:
        raise RankEnvError(f"{src.local_rank}={local_rank} exceeds {src.rank}={rank}")
    if local_size is not None:
        if not 1 <= local_size <= world_size:
            raise RankEnvError(f"{src.local_world_size}={local_size} is not in 1..{world_size} "
                               f"({src.world_size})")
        if local_rank >= local_size:
            raise RankEnvError(f"{src.local_rank}={local_rank} is not below "
                               f"{src.local_world_size}={local_size}")
    if node_rank is not None and node_rank > rank:
        raise RankEnvError(f"{src.node_rank}={node_rank} exceeds {src.rank}={rank}")
    return RankEnv(rank, world_size, local_rank, src.name, node_rank, local_size)


def from_env(env: Mapping[str, str] | None = None) -> RankEnv | None:
    """The rank this process was given by its launcher, or None when no source is set."""
    env = os.environ if env is None else env
    for src in SOURCES:
        if src.rank in env:
            return _from_source(src, env)
        if src.size_without_rank_is_error and src.world_size in env:
            raise RankEnvError(f"{src.world_size} is set but {src.rank} is not")
    return None
