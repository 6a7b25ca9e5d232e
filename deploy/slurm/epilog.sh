#!/bin/bash
# Slurm Epilog: stop this job's ftd daemon on this node and free its memory.
#
# Pairs with prolog.sh (see there for slurm.conf). Stops the daemon the prolog started (SIGTERM,
# then SIGKILL after ftd_stop_timeout seconds), then removes the job's segments
# ($FTD_SHM_DIR/ftd-<job>) and its socket directory (/run/ftd/<job>). The snapshots are of no use
# once the job has ended, and tmpfs memory is not freed until the files are gone.
#
# Always exits 0: Slurm drains a node whose epilog fails.

set -uo pipefail

# ---- settings: the same names as in prolog.sh, overridable in $PROLOG_FTD_CONF --------------------
ftd_run_dir=/run/ftd
ftd_stop_timeout=15
FTD_SHM_DIR=/dev/shm
# -------------------------------------------------------------------------------------------------

say() {
    logger -t ftd-epilog -- "job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true
    echo "ftd-epilog: job ${SLURM_JOB_ID:-?}: $*" >&2
}

# Does session $1 (the supervisor's: it ran setsid) still have a live process? Zombies do not count.
alive() {
    ps -o stat= --sid "$1" 2>/dev/null | grep -qv '^Z'
}

# Is $1 the supervisor the prolog started for job $2? (Guards against a recycled pid.)
is_ours() {
    [ -r "/proc/$1/environ" ] && tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qx "FTD_JOB=$2"
}

stop() {
    local job=${SLURM_JOB_ID:-}
    if [[ ! $job =~ ^[0-9]+$ ]]; then
        say "SLURM_JOB_ID '$job' is not a job id; nothing to clean up"
        return 1
    fi
    local pidfile=$ftd_run_dir/ftd-$job.pid pid=""
    [ -s "$pidfile" ] && pid=$(cat "$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && is_ours "$pid" "$job"; then
        # The supervisor stops the daemon and exits; it leads its own process group (setsid), so
        # the group is gone when both are. One SIGTERM each: ask the supervisor only.
        kill -TERM "$pid" 2>/dev/null
        local waited=0
        while alive "$pid" && (( waited < ftd_stop_timeout * 10 )); do
            sleep 0.1
            waited=$(( waited + 1 ))
        done
        if alive "$pid"; then
            say "daemon did not stop within ${ftd_stop_timeout}s; killing it"
            kill -KILL -- "-$pid" 2>/dev/null
            sleep 0.2
        fi
    fi
    rm -f -- "$pidfile"
    rm -rf --one-file-system -- "${ftd_run_dir:?}/$job"
    rm -rf --one-file-system -- "${FTD_SHM_DIR:?}/ftd-$job"
}

conf=${PROLOG_FTD_CONF:-/etc/ftd/slurm.conf}
if [ -r "$conf" ]; then
    # shellcheck disable=SC1090
    . "$conf"
fi
stop || true
exit 0
