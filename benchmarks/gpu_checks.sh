#!/usr/bin/env bash
# Every check that needs a GPU, in one command, with logs kept: the `gpu` tests (their printed
# run summary is what the README's "Run report" section quotes), the sampler's cost on a real
# GPU, and the pipeline benchmark with GPU settings (1024 px tiles, batch sizes swept, workers
# matched to the cores).
#
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]          # default: gpu-checks/
#   PYRUN="python3" bash benchmarks/gpu_checks.sh ...    # an environment without uv (mgpr and its
#                                                        # dependencies importable by python3)
#
# Exits non-zero when a step fails, after running every step.
set -uo pipefail
out=${1:-gpu-checks}
mkdir -p "$out"
read -r -a run <<<"${PYRUN:-uv run}"
read -r -a run_bench <<<"${PYRUN:-uv run --extra bench}"
status=0

step() {  # step NAME COMMAND...: run, tee the log, remember a failure
    local name=$1
    shift
    echo "=== $name: $*" | tee "$out/$name.log"
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

export PYTHONUNBUFFERED=1
step nvidia-smi nvidia-smi
step pytest-gpu "${run[@]}" python -m pytest -m gpu -s -p no:cacheprovider tests/test_gpu.py tests/test_profiling.py
step monitor-overhead "${run[@]}" python benchmarks/monitor_overhead.py
step pipeline "${run_bench[@]}" python benchmarks/pipeline.py --gpu --out "$out/pipeline.json"
echo "logs in $out/ (exit $status)"
exit $status
