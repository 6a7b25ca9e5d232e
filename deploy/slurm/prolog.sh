#!/bin/bash
# Slurm Prolog: start this job's ftd daemon on this node.
#
# slurm.conf (on every node):
#   Prolog=/etc/slurm/ftd-prolog.sh
#   Epilog=/etc/slurm/ftd-epilog.sh
#   PrologFlags=Alloc     # run at allocation on every node of the job, not at its first step
#
# Site settings: /etc/ftd/slurm.conf, a bash file owned by root that may set any variable of
# the "settings" block below (see it for the names and defaults).
#
# In the job script, so that the trainers find their daemon:
#   export FTD_JOB=$SLURM_JOB_ID FTD_SOCKET=/run/ftd/$SLURM_JOB_ID/ftd.sock
#
# What it does: the daemon runs as the job's user (segments are mode 0600, the trainers must open
# them) with FTD_JOB=$SLURM_JOB_ID, socket /run/ftd/<job>/ftd.sock, and - when the job has more
# than m nodes - FTD_PEERS built from `scontrol show hostnames $SLURM_JOB_NODELIST` and FTD_NODE
# = this node's position in that list. A small supervisor restarts the daemon if it dies (it
# re-adopts its segments from /dev/shm). Log: /var/log/ftd/ftd-<job>.log.
#
# This script always exits 0: Slurm drains a node whose prolog fails, and a job whose daemon
# did not start still trains (the client skips snapshots and says so). Problems are logged to
# syslog (tag ftd-prolog) and to stderr.

set -uo pipefail

# ---- settings (override in $PROLOG_FTD_CONF) ---------------------------------------------------
ftd_enable=1                          # 0: do nothing
ftd_bin=/opt/ftd/venv/bin/ftd         # the ftd entry point (a virtualenv: pip install ftd)
ftd_run_dir=/run/ftd                  # per-job socket directories, pid files, token files
ftd_log_dir=/var/log/ftd
ftd_peer_port=7000                    # gRPC between daemons; bulk data uses port + 1
ftd_port_slots=1                      # >1 on shared nodes: ports move by 2 * (job id % slots)
ftd_peer_host_suffix=""               # appended to node names in FTD_PEERS (e.g. -ib, .ib.example)
ftd_cluster_key=/etc/ftd/cluster.key  # root-only secret; the job's token is derived from it
ftd_start_timeout=30                  # seconds to wait for the daemon's socket
FTD_SHM_DIR=/dev/shm
FTD_EC=4+2
FTD_KEEP=2
FTD_MEMORY_BUDGET=0
FTD_MEMORY_RESERVE=1GiB
FTD_METRICS_PORT=9400                 # moves by job id % slots too; 0 turns the endpoint off
FTD_LOG_LEVEL=INFO
# -------------------------------------------------------------------------------------------------

say() {
    logger -t ftd-prolog -- "job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true
    echo "ftd-prolog: job ${SLURM_JOB_ID:-?}: $*" >&2
}

# The supervisor that runs as the job's user: restarts `ftd daemon` ($1) when it exits, with a
# growing pause while it keeps failing at once; on SIGTERM it stops the daemon and exits.
# shellcheck disable=SC2016
read -r -d '' SUPERVISOR <<'EOF'
child=
trap 'trap - TERM INT; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null; wait; exit 0' TERM INT
pause=1
while :; do
    started=$SECONDS
    "$1" daemon &
    child=$!
    wait "$child"
    rc=$?
    echo "ftd-supervisor: ftd daemon exited with status $rc; restarting in $pause s" >&2
    if (( SECONDS - started > 60 )); then pause=1; fi
    sleep "$pause" & wait $!
    (( pause < 60 )) && pause=$(( pause * 2 ))
done
EOF

start() {
    [ "$ftd_enable" = 1 ] || return 0
    local job=${SLURM_JOB_ID:-}
    if [[ ! $job =~ ^[0-9]+$ ]]; then
        say "SLURM_JOB_ID '$job' is not a job id; not starting a daemon"
        return 1
    fi
    local me=${SLURMD_NODENAME:-$(hostname -s)}
    local uid=${SLURM_JOB_UID:-} gid=${SLURM_JOB_GID:-}
    [ -n "$uid" ] || uid=$(id -u "${SLURM_JOB_USER:?}") || return 1
    [ -n "$gid" ] || gid=$(id -g "$uid") || return 1

    # Nodes of the job, in Slurm's order: the same list on every node.
    local -a nodes
    mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    local index=-1 i
    for i in "${!nodes[@]}"; do
        if [ "${nodes[$i]}" = "$me" ]; then index=$i; break; fi
    done
    if (( index < 0 )); then
        say "this node ($me) is not in the job's node list (${SLURM_JOB_NODELIST}); not starting a daemon"
        return 1
    fi

    local slot=$(( job % (ftd_port_slots > 0 ? ftd_port_slots : 1) ))
    local port=$(( ftd_peer_port + 2 * slot )) metrics_port=0
    (( FTD_METRICS_PORT > 0 )) && metrics_port=$(( FTD_METRICS_PORT + slot ))

    # Erasure coding needs more than m nodes (m from FTD_EC=k+m); fewer: local snapshots only.
    local m=${FTD_EC##*+} peers="" token=""
    if (( ${#nodes[@]} > m )); then
        if [ -r "$ftd_cluster_key" ]; then
            # Every node derives the same per-job secret; it never appears on a command line.
            token=$({ cat "$ftd_cluster_key"; printf ':ftd-job:%s' "$job"; } | sha256sum | cut -c1-64)
            local n
            for n in "${nodes[@]}"; do peers+="${peers:+,}${n}${ftd_peer_host_suffix}:${port}"; done
        else
            say "$ftd_cluster_key is missing: no erasure coding across nodes for this job"
        fi
    fi

    local run=$ftd_run_dir/$job pidfile=$ftd_run_dir/ftd-$job.pid log=$ftd_log_dir/ftd-$job.log
    mkdir -p "$ftd_run_dir" "$ftd_log_dir" || return 1
    install -d -m 0700 -o "$uid" -g "$gid" "$run" || return 1
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "a daemon for this job is already running (pid $(cat "$pidfile"))"
        return 0
    fi

    local -a as_user=()
    if [ "$(id -u)" != "$uid" ]; then
        as_user=(setpriv "--reuid=$uid" "--regid=$gid" --init-groups --)
    fi

    # The daemon's whole environment (an unknown FTD_ variable would be an error).
    local -a daemon_env=(
        PATH=/usr/local/bin:/usr/bin:/bin HOME=/ LANG=C.UTF-8
        FTD_JOB="$job" FTD_SOCKET="$run/ftd.sock" FTD_NODE="$index" FTD_SHM_DIR="$FTD_SHM_DIR"
        FTD_KEEP="$FTD_KEEP" FTD_MEMORY_BUDGET="$FTD_MEMORY_BUDGET" FTD_MEMORY_RESERVE="$FTD_MEMORY_RESERVE"
        FTD_METRICS_PORT="$metrics_port" FTD_LOG_LEVEL="$FTD_LOG_LEVEL"
    )
    if [ -n "$peers" ]; then
        daemon_env+=(FTD_PEERS="$peers" FTD_LISTEN="0.0.0.0:$port" FTD_EC="$FTD_EC" FTD_CLUSTER_TOKEN="$token")
    fi

    (
        cd / || exit 1
        while read -r name; do unset "$name" 2>/dev/null; done < <(compgen -e)
        export "${daemon_env[@]}"
        exec setsid "${as_user[@]}" /bin/bash -c "$SUPERVISOR" ftd-supervisor "$ftd_bin"
    ) </dev/null >>"$log" 2>&1 &
    local pid=$!
    echo "$pid" >"$pidfile"

    local waited=0
    until [ -S "$run/ftd.sock" ]; do
        if ! kill -0 "$pid" 2>/dev/null || (( waited >= ftd_start_timeout * 10 )); then
            say "daemon did not come up within ${ftd_start_timeout}s; last lines of $log:"
            tail -n 5 "$log" 2>/dev/null | while read -r line; do say "  $line"; done
            return 1
        fi
        sleep 0.1
        waited=$(( waited + 1 ))
    done
    say "daemon up (pid $pid, node $index of ${#nodes[@]}${peers:+, EC $FTD_EC}, socket $run/ftd.sock)"
}

conf=${PROLOG_FTD_CONF:-/etc/ftd/slurm.conf}
if [ -r "$conf" ]; then
    # shellcheck disable=SC1090
    . "$conf"
fi
start || say "continuing without an ftd daemon on this node"
exit 0
