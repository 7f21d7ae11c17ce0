#!/usr/bin/env bash
# CI entry point: install SLURM (if missing) and start a local test cluster; root on Debian 12.
#
#   bash scripts/slurm/ci-setup.sh [--nodes N]      # default: 2 virtual nodes (MGPR_SLURM_NODES)
#   export SLURM_CONF=${MGPR_SLURM_DIR:-/tmp/slurmci}/slurm.conf
#
# Arguments go to start.sh. stdout is the `export SLURM_CONF=...` line from start.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/install.sh"
if [[ $# -eq 0 ]]; then set -- --nodes "${MGPR_SLURM_NODES:-2}"; fi
bash "$HERE/start.sh" "$@"
