#!/usr/bin/env bash
# Every check that needs a GPU, in one command, in under 8 minutes on one GPU, with logs kept:
#
#   1. `pytest -m gpu`: real GPU runs (resnet50/fasterrcnn report figures; pinned pool + compile;
#      the reference detector in bf16 on the demo image: 40 of 40, footprint error < 0.5 px;
#      cudaHostRegister on a pool buffer; NVML: a CUDA context only on the rank's own GPU;
#      Faster R-CNN, RetinaNet, FCOS, SSDlite boxes exact under CUDA bf16; a 2-rank NCCL run
#      where 2 GPUs exist; tta=d4 deeplabv3 under bf16, equivariant to 0.5 %; the quick start with
#      tta=flips in bf16: 40 of 40; resnet50-embed in bf16 eager and compiled against fp32,
#      cosine >= 0.999 per tile; maskrcnn in bf16: masks as crops, outlines traced; value_range
#      clip counts on the device, equal to the CPU's). Their printed run
#      summary is what the README quotes;
#   2. the run monitor's sampler cost with NVML reads (benchmarks/monitor_overhead.py);
#   3. the GPU benchmark (benchmarks/accel.py --gpu): resnet50 and fasterrcnn at 1024 px, fp32 and
#      bf16 + channels_last eager, bf16 compiled, bf16 batch sweep 8/16/32 (compute alone); the
#      whole run (with its data-wait share) at batch 16; bounded by MGPR_BENCH_BUDGET_S (240 s)
#      so the script ends in time;
#   4. benchmarks/single_stage_bf16.py on the GPU: a user's RetinaNet / FCOS in fp32, in bf16
#      through torchvision's forward and through mgpr's float32 box path (8 x 1024 px);
#   5. benchmarks/tta_cost.py on the GPU: deeplabv3 bf16, 8 x 512 px, tta=none / flips / d4;
#   6. summary.md: one table of every step's result and the benchmark's figures.
#
#   bash benchmarks/gpu_checks.sh OUT                  # logs and summary.md under OUT/
#   bash benchmarks/gpu_checks.sh --install-only       # only install carried wheels (see below)
#
# Environment: runs with `uv run` where uv and the project's .venv exist, else with python3 on a
# machine that has torch, torchvision, lightning, nvidia-ml-py, matplotlib, scipy, psutil, typer,
# pytest and hypothesis. The other dependencies come as wheels made on a machine with network by
# `bash benchmarks/gpu_wheels.sh PYVER gpu-wheels/pyPYVER` (parts under 60 MiB, one per device
# call's carry): every gpu-wheels/pyX.Y/part-* (or gpu-wheels/part-*) present for this Python is
# installed with `pip install --no-index --find-links` into .gpu-site/ (git-ignored; kept between
# calls on the same machine), which goes first on PYTHONPATH, with the repository.
#
# Exits non-zero when a step fails, after running every step.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
install_only=0
if [ "${1:-}" = "--install-only" ]; then
    install_only=1
    shift
fi
out=${1:-gpu-checks}
site=${MGPR_SITE:-$here/.gpu-site}
wheels=${MGPR_WHEELS:-$here/gpu-wheels}
budget_s=${MGPR_BENCH_BUDGET_S:-240}
status=0

if command -v uv >/dev/null && [ -d .venv ] && [ -z "${PYRUN:-}" ]; then
    PYRUN="uv run"
fi
read -r -a run <<<"${PYRUN:-python3}"

pyver=$("${run[@]}" python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null ||
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
parts=()
for dir in "$wheels/py$pyver"/part-* "$wheels"/part-*; do
    [ -d "$dir" ] && parts+=("$dir")
done
if [ ${#parts[@]} -gt 0 ]; then
    mkdir -p "$site"
    for dir in "${parts[@]}"; do
        echo "=== install $dir -> $site"
        python3 -m pip install --quiet --no-index --no-deps --find-links "$dir" --target "$site" \
            --upgrade "$dir"/*.whl || status=1
    done
fi
if [ -d "$site" ]; then
    export PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$install_only" -eq 1 ]; then
    ls "$site" 2>/dev/null | sed 's/^/  /'
    exit $status
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.md"
echo "| step | exit | seconds | log |" >"$summary"
echo "|---|---|---|---|" >>"$summary"

step() { # step NAME COMMAND...: run, tee the log, remember a failure, add a summary row
    local name=$1
    shift
    local t0=$SECONDS
    echo "=== $name: $*" | tee "$out/$name.log"
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$out/$name.log"
    echo "| $name | $rc | $((SECONDS - t0)) | $name.log |" >>"$summary"
    [ "$rc" -eq 0 ] || status=1
}

export PYTHONUNBUFFERED=1
step machine bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv; python3 -V; nproc; free -g | head -2'
step imports "${run[@]}" python -c 'import mgpr.cli.main, rasterio, pyogrio, pyproj, shapely, \
    hydra, pyarrow, torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, \
    "lightning", lightning.__version__, "rasterio", rasterio.__version__)'
# addopts replaced: pyproject asks for pytest-xdist (-n 2), which the GPU machine lacks; one GPU
# runs its tests in turn anyway.
step pytest-gpu env MGPR_HEAVY_TESTS=1 "${run[@]}" python -m pytest -m "gpu or heavy" -s \
    -p no:cacheprovider -o addopts="--strict-markers" -rA tests/test_gpu.py tests/test_monitor.py tests/test_compile.py
step monitor-overhead "${run[@]}" python benchmarks/monitor_overhead.py --seconds 2 --rounds 3
step accel "${run[@]}" python benchmarks/accel.py --gpu --budget-s "$budget_s" \
    --out "$out/accel.json"
step single-stage "${run[@]}" python benchmarks/single_stage_bf16.py --device cuda --tile 1024 \
    --batch 8 --rounds 3
step tta-cost "${run[@]}" python benchmarks/tta_cost.py --device cuda --bf16 --model deeplabv3 \
    --tile 512 --batch 8 --repeat 3

{
    echo
    echo "GPU benchmark ($out/accel.json):"
    echo
    grep -E '^(compute|whole run|  |SKIPPED|elapsed)' "$out/accel.log" | sed 's/^/    /'
    echo
    echo "Single-stage detectors under bf16 ($out/single-stage.log):"
    echo
    grep -E '^(device|retinanet|fcos)' "$out/single-stage.log" | sed 's/^/    /'
    echo
    echo "Test-time augmentation ($out/tta-cost.log):"
    echo
    grep -E '^(deeplabv3|  tta=)' "$out/tta-cost.log" | sed 's/^/    /'
    echo
    echo "pytest -m gpu:"
    echo
    grep -E '^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed' "$out/pytest-gpu.log" | tail -20 |
        sed 's/^/    /'
} >>"$summary"
cat "$summary"
echo "logs in $out/ (exit $status)"
exit $status
