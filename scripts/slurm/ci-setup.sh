#!/usr/bin/env bash
# CI entry point: install SLURM (if missing) and start a local test cluster; root on Debian 12.
#
#   bash scripts/slurm/ci-setup.sh [--nodes N]
#   export SLURM_CONF=${MGPR_SLURM_DIR:-/tmp/slurmci}/slurm.conf
#
# Arguments go to start.sh. stdout is the `export SLURM_CONF=...` line from start.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/install.sh"
bash "$HERE/start.sh" "$@"
