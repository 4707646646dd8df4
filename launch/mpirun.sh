#!/bin/bash
# dptrain under Open MPI's mpirun: mpirun starts ONE agent per node (ppr:1:node), each agent starts its node's
# workers; the coordinator runs here. No ssh from dptrain itself (mpirun uses its own launcher: ssh, Slurm, PBS...).
#
#   launch/mpirun.sh HOSTFILE BIND_ADDR [dptrain launch args...]
#   launch/mpirun.sh launch/hostfile.example 10.0.0.1 --config configs/lfw.toml --data /shared/lfw.tgz
#
# HOSTFILE is the shared format (`host slots=N`): mpirun reads the hosts from it, dptrain the slots. The run folder
# (RUN, default runs/mpi-<RUN_ID>) holds the 0600 key file and must be on a filesystem every node sees.
# Agents get their host index from OMPI_COMM_WORLD_RANK (one per node, in hostfile order).
set -euo pipefail

HOSTFILE=${1:?usage: $0 HOSTFILE BIND_ADDR [dptrain launch args...]}
BIND=${2:?usage: $0 HOSTFILE BIND_ADDR [dptrain launch args...]}
shift 2
PORT=${PORT:-29500}
RUN_ID=${RUN_ID:-mpi$(date +%Y%m%d%H%M%S)}
RUN=${RUN:-$PWD/runs/mpi-$RUN_ID}
PY=${PY:-$(command -v python)}   # the same interpreter path on every node

# slots of each host, in hostfile order (after --include/--exclude, if you pass them to both)
mapfile -t SLOTS < <("$PY" -c 'import sys
from dptrain.distributed.hostfile import parse_hostfile
for h in parse_hostfile(sys.argv[1]): print(h.slots)' "$HOSTFILE")
NHOSTS=${#SLOTS[@]}
mkdir -p "$RUN"
printf "%s\n" "${SLOTS[@]}" > "$RUN/slots.txt"

"$PY" -m dptrain launch --hostfile "$HOSTFILE" --no-ssh --run-id "$RUN_ID" --bind "$BIND" --port "$PORT" \
    --out "$RUN" "$@" &
LAUNCHER=$!
trap 'kill -INT $LAUNCHER 2>/dev/null; wait $LAUNCHER' INT TERM

mpirun -np "$NHOSTS" --map-by ppr:1:node --hostfile "$HOSTFILE" -x PATH -x PYTHONPATH \
    bash -c 'exec "$0" -m dptrain agent --connect "$1" --run "$2" --keys "$3/agent-keys.json" --wait-keys-s 600 \
             --slots "$(sed -n "$((OMPI_COMM_WORLD_RANK + 1))p" "$3/slots.txt")"' \
    "$PY" "tcp://$BIND:$PORT" "$RUN_ID" "$RUN" &
AGENTS=$!

set +e
wait $LAUNCHER; rc=$?
wait $AGENTS
exit $rc
