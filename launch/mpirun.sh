#!/bin/bash
# dptrain under Open MPI's mpirun: mpirun starts ONE agent per node (ppr:1:node), each agent starts its node's
# workers; the coordinator runs here. No ssh from dptrain itself (mpirun uses its own launcher: ssh, Slurm, PBS...).
#
#   launch/mpirun.sh HOSTFILE BIND_ADDR [dptrain launch args...]
#   launch/mpirun.sh launch/hostfile.example 10.0.0.1 --config configs/lfw.toml --data /shared/lfw.tgz
#   launch/mpirun.sh hosts 10.0.0.1 --exclude b:3 --config configs/lfw.toml ...
#
# HOSTFILE is the shared format (`host slots=N`). --include/--exclude are applied here, once, to the hostfile that
# mpirun and dptrain then both read (RUN/hostfile): the agents mpirun starts are the hosts the coordinator expects.
# The run folder (RUN, default runs/mpi-<RUN_ID>) holds the 0600 key file and must be on a filesystem every node
# sees. Agents get their host index from OMPI_COMM_WORLD_RANK (one per node, in hostfile order) and their name
# from the hostfile. --bind-to none: Open MPI binds a job of <= 2 processes to one core by default, which would put
# the agent and every worker of a node on that core; each node's workers share out its cores themselves.
#
# Exit status: the launcher's (0 done, 1 a host lost, 75 preempted, 130 interrupted; 2 bad arguments), or
# mpirun's when the launcher succeeded (or never heard from the agents) but mpirun failed. A launcher that fails
# before it wrote the keys tells the agents through the key file: the job ends within seconds. Ctrl-C or
# SIGTERM: one orderly stop (a second one stops at once).
set -uo pipefail
say() { echo "mpirun.sh: $*" >&2; }
usage="usage: $0 HOSTFILE BIND_ADDR [dptrain launch args...]"
HOSTFILE=${1:?$usage}
BIND=${2:?$usage}
shift 2
PORT=${PORT:-29500}
RUN_ID=${RUN_ID:-mpi$(date +%Y%m%d%H%M%S)$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')}
RUN=${RUN:-$PWD/runs/mpi-$RUN_ID}
PY=${PY:-$(command -v python3 || command -v python)}   # the same interpreter path on every node
WAIT_S=${WAIT_S:-600}                           # agents wait this long for the keys, then for the coordinator
AGENTS_GRACE_S=${AGENTS_GRACE_S:-20}            # agents still up this long after the launcher ended are stopped

INCLUDE="" EXCLUDE="" ARGS=()
while (($#)); do
    case $1 in
        --include|--exclude) [[ $# -ge 2 ]] || { say "$1 needs a value"; exit 2; }
                             [[ $1 == --include ]] && INCLUDE=$2 || EXCLUDE=$2; shift 2 ;;
        --include=*) INCLUDE=${1#*=}; shift ;;
        --exclude=*) EXCLUDE=${1#*=}; shift ;;
        --hostfile|--hostfile=*|-H|--hosts|--hosts=*|--no-ssh|--run-id|--run-id=*|--bind|--bind=*|--port|--port=*)
            say "$1: set by this script (HOSTFILE, BIND_ADDR, RUN_ID, PORT)"; exit 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

mkdir -p "$RUN" || exit 2
# the hosts, filtered once: RUN/hostfile for both, RUN/hosts.txt and RUN/slots.txt (line = rank + 1) for the agents
"$PY" - "$HOSTFILE" "$INCLUDE" "$EXCLUDE" "$RUN" <<'EOF' || exit 2
import sys
from pathlib import Path

from dptrain.distributed.hostfile import HostfileError, filter_hosts, parse_hostfile

path, include, exclude, run = sys.argv[1:5]
try:
    hosts = filter_hosts(parse_hostfile(path), include=include or None, exclude=exclude or None)
except (HostfileError, OSError) as e:
    sys.exit(f"mpirun.sh: {e}")
for name, text in (("hostfile", "".join(f"{h.hostname} slots={h.slots}\n" for h in hosts)),
                   ("hosts.txt", "".join(f"{h.hostname}\n" for h in hosts)),
                   ("slots.txt", "".join(f"{h.slots}\n" for h in hosts))):
    tmp = Path(run) / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(Path(run) / name)
EOF
NHOSTS=$(wc -l < "$RUN/hosts.txt")
rm -f "$RUN/agent-keys.json"                    # an earlier run's keys: gone before any agent looks

# its own session: a Ctrl-C in the terminal reaches it once, through the trap below, not also from the tty
setsid "$PY" -m dptrain launch --hostfile "$RUN/hostfile" --no-ssh --run-id "$RUN_ID" --bind "$BIND" \
    --port "$PORT" --out "$RUN" "${ARGS[@]}" &
LAUNCHER=$!
# TERM, not INT: a background command of a script starts with INT ignored; the launcher handles TERM from its
# start (before training: it stops, 130; while training: the step, last.npz, then 130), a second TERM at once
trap 'kill -TERM $LAUNCHER 2>/dev/null' INT TERM

EXPORT=(-x PATH)
[[ -n ${PYTHONPATH:-} ]] && EXPORT+=(-x PYTHONPATH)
# mpirun in its own session too: on a Ctrl-C it would kill the agents while the coordinator still needs them for
# its last step and checkpoint; they exit on its STOP instead
setsid mpirun -np "$NHOSTS" --map-by ppr:1:node --bind-to none --hostfile "$RUN/hostfile" "${EXPORT[@]}" \
    bash -c 'i=$((OMPI_COMM_WORLD_RANK + 1)); exec "$0" -m dptrain agent --connect "$1" --run "$2" \
             --keys "$3/agent-keys.json" --wait-keys-s "$4" --wait-coordinator-s "$4" \
             --slots "$(sed -n "${i}p" "$3/slots.txt")" --host-label "$(sed -n "${i}p" "$3/hosts.txt")"' \
    "$PY" "tcp://$BIND:$PORT" "$RUN_ID" "$RUN" "$WAIT_S" &
AGENTS=$!

mpi_rc="" stopped_for_mpi=""
while kill -0 "$LAUNCHER" 2>/dev/null; do
    if [[ -z $mpi_rc ]] && ! kill -0 "$AGENTS" 2>/dev/null; then
        wait "$AGENTS"; mpi_rc=$?
        if ((mpi_rc != 0)); then   # e.g. a host it could not reach: the launcher would wait for it in vain
            say "mpirun exited $mpi_rc before the launcher: stopping it"
            kill -TERM "$LAUNCHER" 2>/dev/null; stopped_for_mpi=1
        fi
    fi
    sleep 0.2
done
wait "$LAUNCHER"; rc=$?
if [[ -z $mpi_rc ]]; then
    for ((i = 0; i < AGENTS_GRACE_S * 5; i++)); do   # agents exit on the coordinator's STOP, or on its silence
        kill -0 "$AGENTS" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$AGENTS" 2>/dev/null; then
        say "agents still running ${AGENTS_GRACE_S} s after the launcher: stopping them"
        kill -TERM "$AGENTS"
    fi
    wait "$AGENTS"; mpi_rc=$?
fi
say "dptrain launch exited $rc, mpirun $mpi_rc; run folder $RUN"
if [[ -n $stopped_for_mpi ]] || ((rc == 0 && mpi_rc != 0)); then
    rc=$mpi_rc                              # the job failed in mpirun: its status, not the launcher's 0 or 130
fi
exit "$rc"
