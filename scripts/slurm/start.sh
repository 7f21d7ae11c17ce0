#!/usr/bin/env bash
# Start a local SLURM test cluster on this machine: munged, slurmctld and one slurmd per virtual node.
#
#   bash scripts/slurm/start.sh [--nodes N]        # N=1 (default): one node named after the host
#                                                  # N>=2: nodes n1..nN on this machine (slurmd -N)
#   eval "$(bash scripts/slurm/start.sh)"          # stdout is only the `export SLURM_CONF=...` line
#
# Environment:
#   MGPR_SLURM_DIR   state dir (default /tmp/slurmci): slurm.conf, gres.conf, pidfiles, logs, fake GPUs
#   MGPR_SLURM_CPUS  CPUs declared per node (default: max(real CPUs, 8)); more than the real count is
#                    allowed (config_overrides) so jobs with --cpus-per-task=4 x 2 tasks fit a 2-core CI box
#   MGPR_SLURM_GPUS  fake GPUs per node (default 2): character devices, so CUDA_VISIBLE_DEVICES gets set
#   MGPR_SLURM_PORT  first slurmd port for N>=2 (default 17001; node i listens on PORT+i-1)
#
# Idempotent: when the daemons already run with the same slurm.conf, it only waits for idle nodes and
# prints the export line; when the config differs, it stops the old cluster first. No systemd needed.
# Recipe and pitfalls: /work/shared/notes/slurm-local.md (Debian 12, SLURM 22.05.8).
set -euo pipefail

NODES=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES="${2:?--nodes needs a number}"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "start.sh: unknown argument '$1' (usage: start.sh [--nodes N])" >&2; exit 2 ;;
    esac
done
if ! [[ "$NODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "start.sh: --nodes must be a positive integer, got '$NODES'" >&2
    exit 2
fi

export PATH="/usr/sbin:/sbin:$PATH"   # munged, slurmctld, slurmd live in /usr/sbin
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${MGPR_SLURM_DIR:-/tmp/slurmci}"
CONF="$DIR/slurm.conf"
GPUS="${MGPR_SLURM_GPUS:-2}"
PORT0="${MGPR_SLURM_PORT:-17001}"
HOST="$(hostname -s)"
t0=$(date +%s%N)

log() { echo "start.sh: $*" >&2; }
alive() { # alive PID: running and not a zombie (PID 1 here reaps slowly; kill -0 succeeds on zombies)
    local st
    st="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$st" && "$st" != Z* ]]
}
pid_alive() { [[ -s "$1" ]] && alive "$(cat "$1")"; }

for bin in slurmctld slurmd sinfo munged; do
    command -v "$bin" >/dev/null || { log "$bin not found; run scripts/slurm/install.sh first"; exit 1; }
done

# SlurmctldHost must resolve.
if ! getent hosts "$HOST" >/dev/null; then
    log "host name $HOST does not resolve; adding '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi

# ---- munge ---------------------------------------------------------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    :
else
    [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    mkdir -p "$DIR" && touch "$DIR/munged.started-here"   # stop.sh stops munged only then
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || { log "munged did not start"; exit 1; }
fi

# ---- node list -----------------------------------------------------------------------------
read -r REAL_CPUS REAL_MEM < <(slurmd -C | sed -nE '1s/.*CPUs=([0-9]+).*RealMemory=([0-9]+).*/\1 \2/p')
if ! [[ "${REAL_CPUS:-}" =~ ^[0-9]+$ && "${REAL_MEM:-}" =~ ^[0-9]+$ ]]; then
    log "cannot read CPUs/RealMemory from 'slurmd -C': $(slurmd -C 2>&1 | head -c 300)"
    exit 1
fi
CPUS="${MGPR_SLURM_CPUS:-$(( REAL_CPUS > 8 ? REAL_CPUS : 8 ))}"
names=()
if [[ "$NODES" -eq 1 ]]; then
    names=("$HOST")
else
    for i in $(seq 1 "$NODES"); do names+=("n$i"); done
fi

# Lightning uses the first node name of SLURM_NODELIST as MASTER_ADDR, so virtual nodes must resolve.
if [[ "$NODES" -gt 1 ]]; then
    for n in "${names[@]}"; do
        if ! getent hosts "$n" >/dev/null; then
            log "node name $n does not resolve; adding '127.0.0.1 $n' to /etc/hosts"
            echo "127.0.0.1 $n" >>/etc/hosts
        fi
    done
fi

# ---- config --------------------------------------------------------------------------------
mkdir -p "$DIR"/{state,spool,log,dev}
new="$(mktemp "$DIR/slurm.conf.XXXXXX")"
{
    cat <<CONF
# Written by scripts/slurm/start.sh --nodes $NODES (local test cluster for tests/CI)
ClusterName=mgprci
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
EnforcePartLimits=ALL
GresTypes=gpu
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# The main scheduler also runs on events (submit, job end), but a requeued job becomes eligible
# only when its BeginTime (cred_expire + 1 s) passes, with no event: at the default 60 s period
# it restarted 64 s after its requeue; every 3 s here.
SchedulerParameters=sched_interval=3
CONF
    i=0
    for n in "${names[@]}"; do
        line="NodeName=$n CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
        line+=" RealMemory=$REAL_MEM Gres=gpu:$GPUS State=UNKNOWN"
        if [[ "$NODES" -gt 1 ]]; then
            line+=" NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$(( PORT0 + i ))"
        fi
        echo "$line"
        i=$(( i + 1 ))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=15"
    echo "PartitionName=high  Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
} >"$new"

newgres="$(mktemp "$DIR/gres.conf.XXXXXX")"
{
    echo "AutoDetect=off"
    for n in "${names[@]}"; do
        mkdir -p "$DIR/dev/$n"
        for g in $(seq 0 $(( GPUS - 1 ))); do
            dev="$DIR/dev/$n/nvidia$g"
            # Must be character devices: plain files are ignored and CUDA_VISIBLE_DEVICES is never set.
            if [[ ! -c "$dev" ]]; then rm -f "$dev"; mknod "$dev" c 195 "$g"; fi
        done
        echo "NodeName=$n Name=gpu File=$DIR/dev/$n/nvidia[0-$(( GPUS - 1 ))]"
    done
} >"$newgres"

running=0
pid_alive "$DIR/slurmctld.pid" && running=1
if [[ $running -eq 1 ]] && cmp -s "$new" "$CONF" && cmp -s "$newgres" "$DIR/gres.conf"; then
    rm -f "$new" "$newgres"
    log "cluster already running with this config"
else
    if [[ $running -eq 1 ]] || compgen -G "$DIR/slurmd.*.pid" >/dev/null; then
        log "config changed or daemons partly up; stopping the old cluster first"
        bash "$HERE/stop.sh" --keep-munge
    fi
    mv "$new" "$CONF"
    mv "$newgres" "$DIR/gres.conf"
fi
export SLURM_CONF="$CONF"

# ---- daemons -------------------------------------------------------------------------------
pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
for n in "${names[@]}"; do
    mkdir -p "$DIR/spool/$n"
    if ! pid_alive "$DIR/slurmd.$n.pid"; then
        if [[ "$NODES" -eq 1 ]]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$n"; fi
    fi
done

# ---- wait for idle nodes -------------------------------------------------------------------
deadline=$(( $(date +%s) + 30 ))
while :; do
    states="$(timeout 5 sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)"
    n_idle="$(awk '$2 ~ /^(idle|mix|alloc)/ {c++} END {print c+0}' <<<"$states")"
    [[ "$n_idle" -eq "$NODES" ]] && break
    if [[ $(date +%s) -ge $deadline ]]; then
        log "nodes not idle after 30 s (sinfo: ${states:-no answer})"
        for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.*.log; do
            [[ -f "$f" ]] && { echo "==> $f <==" >&2; tail -n 20 "$f" >&2; }
        done
        exit 1
    fi
    sleep 0.2
done
log "$NODES node(s) up (${names[*]}; $CPUS CPUs, $GPUS fake GPUs each) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
echo "export SLURM_CONF=$CONF"
