#!/usr/bin/env bash
# netns-cluster.sh — a "cluster on one box" for testing `dptrain launch --hostfile`.
#
# Each host is a Linux network namespace with its own veth, address and a real
# OpenSSH server.  A bridge in the root namespace joins them; the bridge address
# is where the hosts reach the coordinator.  Nothing is routed outward: the
# namespaces have no default route and only a private /24 on-link route.
#
#   launch/netns-cluster.sh up N [--prefix dpt] [--subnet 10.213.0] [--slots 2] [--owner-pid PID]
#   launch/netns-cluster.sh down   [--prefix dpt]
#   launch/netns-cluster.sh status
#   launch/netns-cluster.sh netem HOST|DEV|all --rate 1gbit [--delay 0.1ms] [--loss 1%]
#   launch/netns-cluster.sh netem HOST|DEV|all --clear
#
# State (keys, sshd configs, pid files, logs, ssh_config, known_hosts, hostfile)
# lives in $DPTRAIN_NETNS_DIR (default /tmp/dptrain-netns) or --state DIR.
# One state dir holds one cluster.  Must run as root.  The state dir is made by
# 'up' itself (mode 0700, marked with .dptrain-netns-state); every command refuses
# one it did not make, a symlink, another owner, a looser mode or a parent others
# may write to, before reading anything in it (cluster.env is sourced, as root).
#
# Names (Linux interface names are at most 15 characters, so the prefix is at most 9):
#   namespaces   PREFIX-h1 .. PREFIX-hN       ssh aliases  h1 .. hN
#   bridge       PREFIX-br  (SUBNET.1/24, the coordinator address)
#   veth         PREFIX-v<i> in the root ns  <->  eth0 inside PREFIX-h<i> (SUBNET.(10+i)/24)
#
# ssh into a host reaches this machine's filesystem, so the repo and datasets are at
# the same paths.  sshd gives sessions its compiled-in PATH
# (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin), exactly as on a
# real cluster, so a launcher must run the interpreter by absolute path, e.g.
#   ssh -F STATE/ssh_config h1 /abs/path/to/python -m dptrain agent ...

set -euo pipefail

PROG=$(basename "$0")
STATE=${DPTRAIN_NETNS_DIR:-/tmp/dptrain-netns}
SSHD=${SSHD:-/usr/sbin/sshd}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (namespaces, veths, bridges need CAP_NET_ADMIN)"; }

need_tools() {
    local t
    for t in ip ssh ssh-keygen; do
        command -v "$t" >/dev/null || die "'$t' not found (run .ci/install-system.sh)"
    done
    [[ -x $SSHD ]] || die "$SSHD not found (apt-get install openssh-server, or .ci/install-system.sh)"
}

STATE_MARK=.dptrain-netns-state

state_problem() {
    # Prints why STATE must not be used (nothing when it is this script's own): it is sourced and holds keys, and
    # this runs as root, so a folder someone else prepared (e.g. in /tmp) could run their code as root.
    local me owner mode parent
    me=$(id -u)
    if [[ -L $STATE ]]; then echo "is a symbolic link"; return; fi
    if [[ ! -d $STATE ]]; then echo "is not a directory"; return; fi
    read -r owner mode < <(stat -c '%u %a' -- "$STATE")
    if [[ $owner != "$me" ]]; then echo "is owned by uid $owner, not $me"; return; fi
    if [[ $mode != 700 ]]; then echo "has mode $mode, not 700"; return; fi
    if [[ -L $STATE/$STATE_MARK || ! -f $STATE/$STATE_MARK ]]; then
        echo "was not made by $PROG (no $STATE_MARK in it)"; return
    fi
    parent=$(dirname -- "$(realpath -- "$STATE")")
    read -r owner mode < <(stat -c '%u %a' -- "$parent")
    # others may write to the parent only when it is sticky (like /tmp): else they could swap the folder
    if [[ $owner != 0 && $owner != "$me" ]]; then echo "is in $parent, owned by uid $owner"; return; fi
    if (( (8#$mode & 8#022) && !(8#$mode & 8#1000) )); then echo "is in $parent, writable by others (mode $mode)"; fi
}

check_state() {
    # Dies (one line) when STATE exists but is not this script's own folder; a missing one is fine.
    local why
    [[ -e $STATE || -L $STATE ]] || return 0
    why=$(state_problem)
    [[ -z $why ]] || die "state dir $STATE $why: refusing to use it (remove it, or pass --state with a new path)"
}

make_state() {
    # up: make STATE (0700, marked) unless it is already this script's own.
    if [[ ! -e $STATE && ! -L $STATE ]]; then
        mkdir -p -- "$(dirname -- "$STATE")"
        (umask 077 && mkdir -- "$STATE") || die "cannot make state dir $STATE"
        : >"$STATE/$STATE_MARK"
    fi
    check_state
}

load_state() {
    # Sets PREFIX SUBNET N SLOTS from STATE/cluster.env if present (after check_state: never from a folder we did
    # not make).
    check_state
    if [[ -f $STATE/cluster.env && ! -L $STATE/cluster.env ]]; then
        # shellcheck disable=SC1091
        source "$STATE/cluster.env"
        return 0
    fi
    return 1
}

check_prefix() {
    [[ $1 =~ ^[a-z][a-z0-9]{0,8}$ ]] ||
        die "prefix '$1' must be 1-9 chars of [a-z0-9], starting with a letter (interface names max 15 chars)"
}

# ---------------------------------------------------------------- down
ns_kill_all() {
    # Kill every process in namespace $1: TERM, wait up to ~2 s, then KILL.
    local ns=$1 pids i
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -z $pids ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 20); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -z $pids ]] && return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for i in $(seq 20); do
        [[ -z $(ip netns pids "$ns" 2>/dev/null || true) ]] && return 0
        sleep 0.1
    done
    log "warning: processes still alive in $ns: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
}

cmd_down() {
    local prefix="" ns dev pidf pid
    while [[ $# -gt 0 ]]; do
        case $1 in
            --prefix) prefix=$2; shift 2 ;;
            --state) STATE=$2; shift 2 ;;
            *) die "down: unknown argument '$1'" ;;
        esac
    done
    if [[ -z $prefix ]]; then
        if load_state; then prefix=$PREFIX; else prefix=dpt; fi
    fi
    check_prefix "$prefix"
    need_root
    check_state

    # 1. sshds by pid file (they may live in a namespace that is already gone).
    for pidf in "$STATE"/sshd-*.pid; do
        [[ -f $pidf ]] || continue
        pid=$(cat "$pidf" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] &&
            tr '\0' ' ' </proc/"$pid"/cmdline | grep -qF -- "$STATE/"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$pidf"
    done
    # 2. Everything else still running inside our namespaces (agents, workers, ssh sessions).
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-h[0-9]+$" || true); do
        ns_kill_all "$ns"
        ip netns del "$ns" 2>/dev/null || log "warning: could not delete namespace $ns"
    done
    # 3. Root-side veths (normally gone with their namespace) and the bridge.
    for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^${prefix}-(v[0-9]+|br)$" || true); do
        ip link del "$dev" 2>/dev/null || true
    done
    rm -f "$STATE/cluster.env" "$STATE/owner.pid"
    log "down: prefix $prefix, state $STATE"
}

# ---------------------------------------------------------------- up
cmd_up() {
    local n="" prefix=dpt subnet=10.213.0 slots=2 owner_pid=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            --prefix) prefix=$2; shift 2 ;;
            --subnet) subnet=$2; shift 2 ;;
            --slots) slots=$2; shift 2 ;;
            --state) STATE=$2; shift 2 ;;
            --owner-pid) owner_pid=$2; shift 2 ;;
            -*) die "up: unknown option '$1'" ;;
            *) [[ -z $n ]] || die "up: unexpected argument '$1'"; n=$1; shift ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || die "up: N must be 1..200 (got '${n}')"
    [[ $slots =~ ^[0-9]+$ ]] && ((slots >= 1)) || die "up: --slots must be a positive integer"
    check_prefix "$prefix"
    [[ $subnet =~ ^10\.([0-9]{1,3})\.([0-9]{1,3})$ || $subnet =~ ^192\.168\.([0-9]{1,3})$ ]] ||
        die "up: --subnet must be the first three octets of a private /24: 10.A.B or 192.168.C"
    need_root
    check_state
    need_tools

    # Refuse to collide with an existing cluster or with any address already on this machine.
    if load_state; then
        die "up: state dir $STATE already holds cluster '$PREFIX' ($N hosts); run '$PROG down' first"
    fi
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qE "^${prefix}-h[0-9]+$" ||
        ip link show "${prefix}-br" >/dev/null 2>&1; then
        die "up: namespaces/bridge with prefix '$prefix' already exist; run '$PROG down --prefix $prefix'"
    fi
    if ip -4 -o addr show 2>/dev/null | awk '{print $4}' | grep -q "^${subnet//./\\.}\."; then
        die "up: subnet $subnet.0/24 collides with an address on this machine; pick another --subnet"
    fi
    if ip -4 route show 2>/dev/null | awk '{print $1}' | grep -q "^${subnet//./\\.}\.0/24$"; then
        die "up: a route for $subnet.0/24 already exists; pick another --subnet"
    fi

    make_state
    # Anything below fails -> tear down what we built (safe after a partial up).
    trap 'rc=$?; trap - ERR; set +E; log "up failed (exit $rc); cleaning up"; cmd_down --prefix "$prefix" --state "$STATE" || true; exit $rc' ERR
    set -E

    local br="${prefix}-br" coord="$subnet.1"
    cat >"$STATE/cluster.env" <<EOF
PREFIX=$prefix
SUBNET=$subnet
N=$n
SLOTS=$slots
BRIDGE=$br
COORDINATOR=$coord
EOF
    if [[ -n $owner_pid ]]; then
        # pid + start time, so a recycled pid is not mistaken for a live owner.
        echo "$owner_pid $(awk '{print $22}' /proc/"$owner_pid"/stat 2>/dev/null || echo 0)" >"$STATE/owner.pid"
    fi

    # Keys: one host key for every sshd of this cluster, one client key.
    rm -f "$STATE"/ssh_host_ed25519_key* "$STATE"/id_ed25519*
    ssh-keygen -q -t ed25519 -N '' -C "dptrain-netns-host-$prefix" -f "$STATE/ssh_host_ed25519_key"
    ssh-keygen -q -t ed25519 -N '' -C "dptrain-netns-client-$prefix" -f "$STATE/id_ed25519"
    cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
    chmod 600 "$STATE/authorized_keys" "$STATE/id_ed25519" "$STATE/ssh_host_ed25519_key"

    # sshd refuses to start without its privilege-separation directory.
    mkdir -p /run/sshd
    chmod 755 /run/sshd

    # With UsePAM no, OpenSSH refuses even key logins to an account whose password
    # field starts with '!' (locked).  Fall back to PAM (account check only) then.
    local usepam=${DPTRAIN_NETNS_USEPAM:-}
    if [[ -z $usepam ]]; then
        usepam=no
        if [[ $(getent shadow root 2>/dev/null | cut -d: -f2) == '!'* ]]; then
            usepam=yes
            log "root's password is locked ('!'); using UsePAM yes so key login is allowed"
        fi
    fi

    ip link add "$br" type bridge
    ip addr add "$coord/24" dev "$br"
    ip link set "$br" up

    local hostkey_pub
    hostkey_pub=$(cut -d' ' -f1,2 "$STATE/ssh_host_ed25519_key.pub")
    : >"$STATE/known_hosts"
    : >"$STATE/hostfile"
    : >"$STATE/hostfile.ip"
    {
        echo "# dptrain netns cluster '$prefix' — use with: ssh -F $STATE/ssh_config h1"
        echo "# Every host shares one host key; known_hosts lists each by alias and address."
    } >"$STATE/ssh_config"

    local i ns veth addr
    for i in $(seq 1 "$n"); do
        ns="${prefix}-h$i"
        veth="${prefix}-v$i"
        addr="$subnet.$((10 + i))"
        ip netns add "$ns"
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$br"
        ip link set "$veth" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up

        cat >"$STATE/sshd-h$i.conf" <<EOF
# sshd for $ns ($addr); started with: ip netns exec $ns $SSHD -f THIS -E $STATE/sshd-h$i.log
ListenAddress $addr:22
AddressFamily inet
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd-h$i.pid
AuthorizedKeysFile $STATE/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM $usepam
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 100:30:200
MaxSessions 50
LoginGraceTime 20
ClientAliveInterval 5
ClientAliveCountMax 3
LogLevel INFO
EOF
        ip netns exec "$ns" "$SSHD" -f "$STATE/sshd-h$i.conf" -E "$STATE/sshd-h$i.log"

        echo "h$i,$addr $hostkey_pub" >>"$STATE/known_hosts"
        echo "h$i slots=$slots" >>"$STATE/hostfile"
        echo "$addr slots=$slots" >>"$STATE/hostfile.ip"
        cat >>"$STATE/ssh_config" <<EOF

Host h$i $ns
    HostName $addr
EOF
    done
    cat >>"$STATE/ssh_config" <<EOF

Host *
    User root
    Port 22
    IdentityFile $STATE/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $STATE/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    ConnectTimeout 5
    ConnectionAttempts 1
    ServerAliveInterval 2
    ServerAliveCountMax 3
    ControlMaster no
    ControlPath none
    LogLevel ERROR
EOF

    # Wait for every sshd to accept connections on its address (inside its namespace).
    local deadline=$((SECONDS + 10))
    for i in $(seq 1 "$n"); do
        ns="${prefix}-h$i"
        addr="$subnet.$((10 + i))"
        until ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                cat "$STATE/sshd-h$i.log" >&2 || true
                false # -> ERR trap -> down
            fi
            sleep 0.05
        done
    done
    trap - ERR
    set +E

    cat <<EOF
netns cluster '$prefix' is up: $n host(s), coordinator address $coord (bridge $br)
  state dir   $STATE
  hosts       $(for i in $(seq 1 "$n"); do printf 'h%d=%s ' "$i" "$subnet.$((10 + i))"; done)
  hostfile    $STATE/hostfile        (by alias; needs the ssh_config)
              $STATE/hostfile.ip     (by address)
  ssh         ssh -F $STATE/ssh_config h1 true
  in-ns shell ip netns exec ${prefix}-h1 bash
  launch      dptrain launch --hostfile $STATE/hostfile ...   (ssh with -F $STATE/ssh_config;
              the coordinator binds $coord; run python by absolute path, e.g. $(python3 -c "import sys; print(sys.executable)" 2>/dev/null || echo /path/to/python3))
  shape       $PROG netem h1 --rate 1gbit --delay 0.1ms   |   $PROG netem h1 --clear
  tear down   $PROG down
EOF
}

# ---------------------------------------------------------------- status
cmd_status() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            --state) STATE=$2; shift 2 ;;
            *) die "status: unknown argument '$1'" ;;
        esac
    done
    if ! load_state; then
        echo "no cluster in $STATE"
        local stray
        stray=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^dpt[a-z0-9]*-h[0-9]+$' || true)
        [[ -n $stray ]] && echo "namespaces that look like dptrain clusters:" && echo "$stray"
        return 0
    fi
    echo "cluster '$PREFIX': $N host(s), bridge $BRIDGE $COORDINATOR/24, state $STATE"
    local i ns addr pid sshd_state qd up
    for i in $(seq 1 "$N"); do
        ns="${PREFIX}-h$i"
        addr="$SUBNET.$((10 + i))"
        pid=$(cat "$STATE/sshd-h$i.pid" 2>/dev/null || echo "")
        if [[ -n $pid ]] && [[ -r /proc/$pid/stat ]] && [[ $(awk '{print $3}' /proc/"$pid"/stat) != Z ]]; then sshd_state="sshd pid $pid"; else sshd_state="sshd DOWN"; fi
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            up=$(ip -n "$ns" -br link show eth0 2>/dev/null | awk '{print $2}')
            qd=$(tc qdisc show dev "${PREFIX}-v$i" 2>/dev/null | grep -E 'netem|tbf' | head -1 || true)
            printf '  h%-3s %-15s ns %-14s eth0 %-5s %-16s procs %-3s %s\n' "$i" "$addr" "$ns" "${up:-?}" \
                "$sshd_state" "$(ip netns pids "$ns" | wc -l)" "${qd:+[$qd]}"
        else
            printf '  h%-3s %-15s ns %-14s MISSING\n' "$i" "$addr" "$ns"
        fi
    done
}

# ---------------------------------------------------------------- netem
have_netem() {
    command -v modprobe >/dev/null && modprobe -q sch_netem 2>/dev/null || true
    # Probe on the loopback of a host namespace (noqueue there): add, then remove.
    local ns="${PREFIX}-h1"
    if ip netns exec "$ns" tc qdisc add dev lo root handle 77: netem 2>/dev/null; then
        ip netns exec "$ns" tc qdisc del dev lo root 2>/dev/null || true
        return 0
    fi
    return 1
}

tbf_burst() {
    # $1: a tc rate like 1gbit, 100mbit, 500kbit, 10mbps -> burst in bytes.
    local r=${1,,} num unit bps
    [[ $r =~ ^([0-9]+)(\.[0-9]+)?([a-z]*)$ ]] || { echo 1mb; return; }
    num=${BASH_REMATCH[1]}
    unit=${BASH_REMATCH[3]}
    case $unit in
        "" | bit) bps=$num ;;
        kbit) bps=$((num * 1000)) ;;
        mbit) bps=$((num * 1000000)) ;;
        gbit) bps=$((num * 1000000000)) ;;
        bps) bps=$((num * 8)) ;;
        kbps) bps=$((num * 8000)) ;;
        mbps) bps=$((num * 8000000)) ;;
        gbps) bps=$((num * 8000000000)) ;;
        *) echo 1mb; return ;;
    esac
    local b=$((bps / 8 / 100))
    ((b < 65536)) && b=65536
    echo "$b"
}

cmd_netem() {
    local target="" rate="" delay="" loss="" clear=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --rate) rate=$2; shift 2 ;;
            --delay) delay=$2; shift 2 ;;
            --loss) loss=$2; shift 2 ;;
            --clear) clear=1; shift ;;
            --state) STATE=$2; shift 2 ;;
            -*) die "netem: unknown option '$1'" ;;
            *) [[ -z $target ]] || die "netem: unexpected argument '$1'"; target=$1; shift ;;
        esac
    done
    [[ -n $target ]] || die "netem: which host? (h1, ${PREFIX:-dpt}-h1, ${PREFIX:-dpt}-v1 or all)"
    need_root
    load_state || die "netem: no cluster in $STATE"
    command -v tc >/dev/null || die "'tc' not found (iproute2)"
    ((clear)) || [[ -n $rate || -n $delay || -n $loss ]] || die "netem: give --rate/--delay/--loss or --clear"

    local idx=() i
    case $target in
        all) idx=($(seq 1 "$N")) ;;
        h[0-9]*) idx=("${target#h}") ;;
        "$PREFIX"-h[0-9]*) idx=("${target#"$PREFIX"-h}") ;;
        "$PREFIX"-v[0-9]*) idx=("${target#"$PREFIX"-v}") ;;
        *) die "netem: unknown host/device '$target'" ;;
    esac
    for i in "${idx[@]}"; do
        [[ $i =~ ^[0-9]+$ ]] && ((i >= 1 && i <= N)) || die "netem: no host h$i in this cluster"
        # Shape both directions: root-side veth egress = traffic to the host,
        # eth0 egress inside the namespace = traffic from the host.
        if ((clear)); then
            tc qdisc del dev "${PREFIX}-v$i" root 2>/dev/null || true
            ip netns exec "${PREFIX}-h$i" tc qdisc del dev eth0 root 2>/dev/null || true
            log "netem: cleared h$i"
        else
            local args
            if [[ -n $delay || -n $loss ]]; then
                have_netem || die "netem: this kernel has no sch_netem (CONFIG_NET_SCH_NETEM), so --delay/--loss" \
                    "are unavailable; --rate alone works (tbf)"
                args=(netem limit 100000)
                [[ -n $delay ]] && args+=(delay "$delay")
                [[ -n $loss ]] && args+=(loss "$loss")
                [[ -n $rate ]] && args+=(rate "$rate")
            else
                # Token bucket: burst of ~10 ms at the rate (at least 64 KiB) so
                # the kernel timer granularity does not cap the rate.
                args=(tbf rate "$rate" burst "$(tbf_burst "$rate")" latency 50ms)
            fi
            tc qdisc replace dev "${PREFIX}-v$i" root "${args[@]}"
            ip netns exec "${PREFIX}-h$i" tc qdisc replace dev eth0 root "${args[@]}"
            log "netem: h$i both directions: ${args[*]}"
        fi
    done
}

# ---------------------------------------------------------------- main
[[ $# -ge 1 ]] || { usage; exit 2; }
cmd=$1
shift
case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    netem) cmd_netem "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
