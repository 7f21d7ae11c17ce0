#!/usr/bin/env bash
# Stop the local SLURM test cluster started by start.sh: TERM every slurmd, then slurmctld, then munged,
# each by its pidfile, and wait until each has really exited (not just become a zombie).
#
#   bash scripts/slurm/stop.sh [--clean] [--keep-munge]
#     --clean       also remove the state dir (MGPR_SLURM_DIR, default /tmp/slurmci)
#     --keep-munge  leave munged running (start.sh uses this when it restarts with a new config)
# Idempotent: a daemon that is not running is skipped.
set -euo pipefail

CLEAN=0
KEEP_MUNGE=0
for a in "$@"; do
    case "$a" in
        --clean) CLEAN=1 ;;
        --keep-munge) KEEP_MUNGE=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "stop.sh: unknown argument '$a' (usage: stop.sh [--clean] [--keep-munge])" >&2; exit 2 ;;
    esac
done
DIR="${MGPR_SLURM_DIR:-/tmp/slurmci}"

log() { echo "stop.sh: $*" >&2; }
alive() { # PID 1 here reaps slowly: kill -0 succeeds on a <defunct> process, so look at its state
    local st
    st="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$st" && "$st" != Z* ]]
}
stop_pidfile() { # stop_pidfile FILE NAME: TERM, wait up to 20 s, then KILL
    local f="$1" name="$2" pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! alive "$pid"; then
        rm -f "$f"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        alive "$pid" || { log "stopped $name (pid $pid)"; rm -f "$f"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored TERM for 20 s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

shopt -s nullglob
for f in "$DIR"/slurmd.*.pid "$DIR"/slurmd.pid; do
    n="$(basename "$f" .pid)"
    stop_pidfile "$f" "$n"
done
stop_pidfile "$DIR/slurmctld.pid" slurmctld
# munged only when start.sh started it (a system munged serving other things is left alone).
if [[ $KEEP_MUNGE -eq 0 && -e "$DIR/munged.started-here" ]]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$DIR/munged.started-here"
fi
if [[ $CLEAN -eq 1 && -d "$DIR" ]]; then
    rm -rf -- "$DIR"
    log "removed $DIR"
fi
