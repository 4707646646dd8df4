#!/usr/bin/env bash
# System packages for the multi-host tests (launch/netns-cluster.sh, tests/test_netns_cluster.py,
# tests/test_slurm.py, tests/test_mpirun.py).
# Run as root on Debian/Ubuntu.  Idempotent: skips apt entirely when everything is present.
# It never starts, enables or reconfigures the machine's own ssh service: the test
# cluster runs its own sshd processes with their own config inside network namespaces.
# Afterwards run the tests with DPTRAIN_REQUIRE_NETNS=1 so "cannot use namespaces"
# fails instead of skipping.
set -euo pipefail

[[ $(id -u) -eq 0 ]] || { echo "install-system.sh: must run as root" >&2; exit 1; }

# slurm-wlm + munge: tests/test_slurm.py runs slurmctld and a slurmd per namespace host (their own config and
# state, never the machine's services); openmpi-bin: tests/test_mpirun.py runs mpirun over the namespaces' sshd.
PKGS=(openssh-server openssh-client iproute2 procps slurm-wlm munge openmpi-bin)

missing=()
for p in "${PKGS[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) != installed ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "install-system.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d exit 101 = "do not start services": keep the package's postinst
    # from starting (or restarting) the machine's own sshd.  Only ours is removed.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    trap 'if ((created_policy)); then rm -f "$policy"; fi' EXIT
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-system.sh: ${PKGS[*]} already installed"
fi

# sshd's privilege-separation directory (normally made by the service unit, which we do not start).
mkdir -p /run/sshd
chmod 755 /run/sshd

for t in ip tc ssh ssh-keygen pgrep nsenter /usr/sbin/sshd slurmctld slurmd sbatch munged mpirun; do
    command -v "$t" >/dev/null || { echo "install-system.sh: '$t' still missing" >&2; exit 1; }
done
/usr/sbin/sshd -V 2>&1 | head -1 || true
echo "install-system.sh: ok"
