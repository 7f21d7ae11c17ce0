"""Segmentation figures: whole run vs compute alone, assembly s per gigapixel, peak RSS in size.

1. ``--run``: ``mgpr model=<model>`` on a generated raster (``--size`` px, ``--tile`` px tiles,
   ``--overlap``), tiles/s of the run's predict loop (report.json) against the same adapter's
   compute alone (scale + prepare + forward + postprocess on in-memory uint8 batches of the
   same shape, median batch time), in ``--rounds`` interleaved rounds; target ratio >= 0.90 on
   CPU.
2. ``--assembly``: :func:`mgpr.outputs.cog.assemble_cog` of a ``--assembly-px`` square class map
   from part rasters shaped as a run writes them (one core run per tile row), seconds per
   gigapixel and the COG's bytes per pixel.
3. ``--memory``: peak RSS of the largest process of the whole command (the rank, through
   ``ru_maxrss``; the predict loop's sampler figure beside it) for each of ``--sizes`` px
   rasters, ``model=reference-seg probabilities=true``, ``--mem-tile`` px tiles (target: flat,
   within 20 %).

    uv run python benchmarks/segmentation.py --run --assembly --memory [--sizes 8192,20000,40000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mgpr_run import mgpr_command, run_mgpr

from mgpr.testimage import TestImageSpec, write_test_image


def compute_alone(model: str, tile: int, batch: int, seconds: float) -> float:
    """Tiles/s of the adapter alone on in-memory uint8 (batch, 3, tile, tile) tiles scaled as
    a run scales them: the median batch time over ``seconds`` of batches after a warm-up."""
    from mgpr.data.scaling import ValueScaler
    from mgpr.models import build_model

    adapter = build_model(model, "none", tile_size=tile)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, tile, tile), dtype=torch.uint8, generator=gen)
    scale = ValueScaler()
    times: list[float] = []
    with torch.inference_mode():
        adapter.postprocess(adapter.forward(adapter.prepare(scale(x))), tile)  # warm-up
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            adapter.postprocess(adapter.forward(adapter.prepare(scale(x))), tile)
            times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def bench_run(a: argparse.Namespace, tmp: Path) -> None:
    """Rounds of compute alone, whole run, compute alone, ... interleaved (this VM's speed
    drifts by 15 % between minutes): each run's rate against the mean of the two compute-alone
    figures around it, and the median over rounds."""
    img = write_test_image(
        tmp / "run.tif", TestImageSpec(width=a.size, height=a.size, objects=40, seed=1)
    )
    overrides = [
        f"input_path={img.path}",
        f"model={a.model}",
        "weights=none",
        f"tile_size={a.tile}",
        f"overlap={a.overlap}",
        f"batch_size={a.batch}",
        f"workers={a.workers}",
        "accelerator=cpu",
        "precision=32",
    ]
    alone = [compute_alone(a.model, a.tile, a.batch, a.alone_s)]
    ratios, steady_ratios = [], []
    for i in range(a.rounds):
        report, wall = run_mgpr(overrides, tmp / f"run{i}")
        alone.append(compute_alone(a.model, a.tile, a.batch, a.alone_s))
        totals, (rank,) = report["totals"], report["ranks"]
        ref = (alone[-2] + alone[-1]) / 2
        whole = float(totals["tiles_per_s"])
        steady = float(rank.get("steady_tiles_per_s") or whole)
        ratios.append(whole / ref)
        steady_ratios.append(steady / ref)
        loop = 100 * (float(totals["compute_share"]) + sum(totals["stage_shares"].values()))
        print(
            f"run {i}: model={a.model} {a.size} px, tile {a.tile}, overlap {a.overlap}, "
            f"batch {a.batch}, workers {a.workers}, {totals['tiles']} tiles: whole run "
            f"{whole:.2f} tiles/s ({steady:.2f} after the first batch), compute alone "
            f"{alone[-2]:.2f} / {alone[-1]:.2f} tiles/s before / after -> ratio "
            f"{ratios[-1]:.3f} ({steady_ratios[-1]:.3f}); in the loop: model + postprocess "
            f"{loop:.1f} %, data wait {100 * float(totals['data_wait_share']):.1f} % "
            f"(command {wall:.1f} s)"
        )
    print(
        f"run: whole run / compute alone, median of {a.rounds}: {np.median(ratios):.3f} "
        f"(after the first batch {np.median(steady_ratios):.3f}); target >= 0.90"
    )


def bench_assembly(a: argparse.Namespace, tmp: Path) -> None:
    from affine import Affine

    from mgpr.outputs.cog import Grid, PartRaster, assemble_cog, class_colours, write_part

    n, tile = a.assembly_px, 512
    rng = np.random.default_rng(0)
    parts = []
    t = time.perf_counter()
    for row0 in range(0, n, tile):
        h = min(tile, n - row0)
        # blocky classes like land cover: 16 px cells of 6 classes
        cells = rng.integers(0, 6, size=(h // 16 + 1, n // 16 + 1), dtype=np.uint8)
        ids = np.repeat(np.repeat(cells, 16, axis=0), 16, axis=1)[:h, :n][None]
        path = tmp / f"part{row0}.tif"
        write_part(path, np.ascontiguousarray(ids), row0, 0, 255)
        parts.append(PartRaster(path, row0, 0, h, n))
    t_parts = time.perf_counter() - t
    grid = Grid(n, n, Affine(0.1, 0, 500000, 0, -0.1, 5000000), None)
    t = time.perf_counter()
    out = assemble_cog(
        tmp / "assembled.tif",
        parts,
        grid,
        bands=1,
        dtype=np.dtype(np.uint8),
        nodata=255,
        resampling="MODE",
        colours=class_colours(6),
    )
    dt = time.perf_counter() - t
    gpx = n * n / 1e9
    print(
        f"assembly: {n} x {n} px ({gpx:.3f} Gpx) from {len(parts)} parts: {dt:.2f} s = "
        f"{dt / gpx:.1f} s per gigapixel; COG {out.stat().st_size / (n * n):.4f} bytes/px; "
        f"writing the parts took {t_parts:.2f} s"
    )


#: Runs a command and prints the largest resident set of it and its waited-for descendants
#: (``ru_maxrss`` of RUSAGE_CHILDREN, KiB on Linux): the rank's peak over the WHOLE command,
#: assembly and previews included, or a DataLoader worker's if that was larger.
_MAXRSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def bench_memory(a: argparse.Namespace, tmp: Path) -> None:
    peak: dict[int, float] = {}
    sizes = [int(v) for v in a.sizes.split(",")]
    for size in sizes:
        t = time.perf_counter()
        img = write_test_image(
            tmp / f"mem{size}.tif",
            TestImageSpec(width=size, height=size, objects=50, seed=2, num_threads=0),
        )
        made = time.perf_counter() - t
        run = tmp / f"mem{size}"
        cmd = [
            *mgpr_command(),
            f"input_path={img.path}",
            "model=reference-seg",
            f"tile_size={a.mem_tile}",
            "overlap=64",
            f"workers={a.workers}",
            "accelerator=cpu",
            "probabilities=true",
            "progress=false",
            f"output_dir={run}",
        ]
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _MAXRSS, *cmd], capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        peak[size] = int(proc.stdout.split()[-1]) / 2**20  # KiB -> GiB
        report = json.loads((run / "report.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
        print(
            f"memory: {size} px ({report['totals']['tiles']} tiles of {a.mem_tile} px, "
            f"probabilities=true): peak RSS of the largest process {peak[size]:.3f} GiB over "
            f"the whole command; predict loop sampler {report['totals']['mem_peak_gib']:.3f} "
            f"GiB; command {wall:.1f} s, predict loop {summary['predict_loop_s']:.1f} s (image "
            f"made in {made:.1f} s)"
        )
        Path(img.path).unlink()
        shutil.rmtree(run)
    for size in sizes[1:]:
        print(f"memory: peak RSS {size} px / {sizes[0]} px = {peak[size] / peak[sizes[0]]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true")
    p.add_argument("--assembly", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--model", default="lraspp")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="--run: interleaved runs")
    p.add_argument("--alone-s", type=float, default=8.0, help="--run: seconds per compute-alone")
    p.add_argument("--assembly-px", type=int, default=16384)
    p.add_argument("--sizes", default="8192,40000", help="--memory: raster sides, px")
    p.add_argument("--mem-tile", type=int, default=1024)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mgpr-seg-") as tmp_s:
        tmp = Path(tmp_s)
        if a.run:
            bench_run(a, tmp)
        if a.assembly:
            bench_assembly(a, tmp)
        if a.memory:
            bench_memory(a, tmp)


if __name__ == "__main__":
    main()
