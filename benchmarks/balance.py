"""Do ranks finish together? Per-rank busy time, equal static slices vs chunks claimed.

Writes the issue's raster (8192 x 4096 px, top half nodata through an internal mask, the way
orthomosaics have an empty collar) and runs the real ``mgpr`` CLI with 2 CPU ranks (gloo) on it,
each scenario twice: with the static split of earlier versions (``MGPR_BENCH_STATIC_SPLIT=1``,
a benchmark-only switch: each rank one contiguous half of the plan) and with chunk claiming
(the default). A model's cost per tile is simulated with ``--cost`` seconds of sleep per read
(non-empty) tile on every rank (``MGPR_TEST_TILE_DELAY_RANK<r>``, test-only), so the figures
do not depend on this machine's CPU. Scenarios: the clustered nodata alone, and the same with
rank 1 ``--slow-factor`` times slower. Prints each rank's busy time (report.json ``wall_s``: its
predict loop), tiles and the ratio min/max busy time (1.0 = finished together).

    uv run python benchmarks/balance.py [--tile 256] [--cost 0.02] [--slow-factor 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from mgpr_run import run_mgpr

from mgpr.testimage import TestImageSpec, write_test_image


def clustered_raster(path: Path, width: int, height: int) -> Path:
    """The test image with its top half masked out (nodata)."""
    write_test_image(path, TestImageSpec(width=width, height=height, objects=40))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        mask = np.full((height, width), 255, dtype=np.uint8)
        mask[: height // 2] = 0
        dst.write_mask(mask)
    return path


def run(image: Path, a: argparse.Namespace, out: Path, extra_env: dict[str, str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MGPR_"))}
    env.update(PYTHONWARNINGS="ignore", **extra_env)
    report, _ = run_mgpr(
        [
            f"input_path={image}",
            f"model={a.model}",
            "weights=none",
            f"tile_size={a.tile}",
            f"batch_size={a.batch_size}",
            f"workers={a.workers}",
            "gpus=2",
            "accelerator=cpu",
            "join_timeout_s=600",  # the static split waits long for its slow rank
        ],
        out,
        env,
    )
    return sorted(report["ranks"], key=lambda r: r["global_rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--model", default="reference")
    p.add_argument("--cost", type=float, default=0.02, help="simulated s per tile, every rank")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--slow-factor", type=float, default=2.0, help="rank 1 this many x slower")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mgpr-balance-") as tmp:
        image = clustered_raster(Path(tmp) / "clustered.tif", a.width, a.height)
        print(
            f"{a.width} x {a.height} px, top half nodata, {a.tile} px tiles, model={a.model}, "
            f"batch_size={a.batch_size}, workers={a.workers}, 2 CPU ranks"
        )
        print(f"simulated model cost {a.cost} s per non-empty tile")
        cost = {f"MGPR_TEST_TILE_DELAY_RANK{r}": str(a.cost) for r in (0, 1)}
        scenarios = {
            "clustered nodata": cost,
            f"+ rank 1 {a.slow_factor:g}x slower": {
                **cost,
                "MGPR_TEST_TILE_DELAY_RANK1": str(a.cost * a.slow_factor),
            },
        }
        modes = {"static split": {"MGPR_BENCH_STATIC_SPLIT": "1"}, "claimed": {}}
        for i, (name, slow) in enumerate(scenarios.items()):
            for mode, switch in modes.items():
                ranks = run(image, a, Path(tmp) / f"run{i}-{mode[0]}", {**slow, **switch})
                walls = [float(r["wall_s"]) for r in ranks]
                ratio = min(walls) / max(walls) if max(walls) > 0 else 1.0
                per_rank = ", ".join(
                    f"rank {r['global_rank']} {float(r['wall_s']):6.2f} s / {r['tiles']:3d} tiles"
                    for r in ranks
                )
                print(f"{name:<34} {mode:<12}: {per_rank}; busy-time ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
