#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client) and munge for a local test cluster.
# Idempotent: does nothing when slurmctld is already on PATH. Needs root (or sudo) and apt.
# See /work/shared/notes/slurm-local.md (verified on Debian 12, SLURM 22.05.8).
set -euo pipefail

if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
    && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    echo "install.sh: SLURM already installed ($(slurmctld -V 2>/dev/null || echo unknown)); skipping" >&2
    exit 0
fi
# munged lives in /usr/sbin, which a non-login root shell may not have on PATH.
if [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/bin/sbatch ]]; then
    echo "install.sh: SLURM already installed in /usr/sbin; skipping" >&2
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install.sh: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

start=$(date +%s)
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
echo "install.sh: installed $(/usr/sbin/slurmctld -V) in $(( $(date +%s) - start )) s" >&2
