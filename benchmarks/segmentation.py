"""Segmentation figures: whole run vs compute alone, assembly s per gigapixel, peak RSS in size.

1. ``--run``: ``mgpr model=<model>`` on a generated raster (``--size`` px, ``--tile`` px tiles,
   ``--overlap``), tiles/s of the run's predict loop (report.json) against the same adapter's
   compute alone (prepare + forward + postprocess on in-memory batches of the same shape, best
   of ``--rounds``); target ratio >= 0.90 on CPU.
2. ``--assembly``: :func:`mgpr.outputs.cog.assemble_cog` of a ``--assembly-px`` square class map
   from part rasters shaped as a run writes them (one core run per tile row), seconds per
   gigapixel and the COG's bytes per pixel.
3. ``--memory``: peak RSS of the rank (report.json ``mem_peak_gib``) for ``--small`` vs
   ``--big`` px rasters, ``model=reference-seg``, ``--mem-tile`` px tiles (target within 20 %).

    uv run python benchmarks/segmentation.py --run --assembly --memory [--big 40000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mgpr_run import run_mgpr

from mgpr.testimage import TestImageSpec, write_test_image


def compute_alone(model: str, tile: int, batch: int, rounds: int) -> float:
    """Tiles/s of the adapter alone on in-memory (batch, 3, tile, tile) tiles in [0, 1]."""
    from mgpr.models import build_model

    adapter = build_model(model, "none", tile_size=tile)
    x = torch.rand(batch, 3, tile, tile)
    best = float("inf")
    with torch.inference_mode():
        adapter.postprocess(adapter.forward(adapter.prepare(x)), tile)  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            adapter.postprocess(adapter.forward(adapter.prepare(x)), tile)
            best = min(best, time.perf_counter() - t)
    return batch / best


def bench_run(a: argparse.Namespace, tmp: Path) -> None:
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
    report, wall = run_mgpr(overrides, tmp / "run")
    whole = float(report["totals"]["tiles_per_s"])
    alone = compute_alone(a.model, a.tile, a.batch, a.rounds)
    print(
        f"run: model={a.model} {a.size} px, tile {a.tile}, overlap {a.overlap}, batch {a.batch}, "
        f"tiles={report['totals']['tiles']}: whole run {whole:.2f} tiles/s, compute alone "
        f"{alone:.2f} tiles/s, ratio {whole / alone:.3f} (command {wall:.1f} s)"
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


def bench_memory(a: argparse.Namespace, tmp: Path) -> None:
    rows = {}
    for size in (a.small, a.big):
        t = time.perf_counter()
        img = write_test_image(
            tmp / f"mem{size}.tif",
            TestImageSpec(width=size, height=size, objects=50, seed=2, num_threads=0),
        )
        made = time.perf_counter() - t
        overrides = [
            f"input_path={img.path}",
            "model=reference-seg",
            f"tile_size={a.mem_tile}",
            "overlap=64",
            f"workers={a.workers}",
            "accelerator=cpu",
        ]
        report, wall = run_mgpr(overrides, tmp / f"mem{size}")
        rows[size] = float(report["totals"]["mem_peak_gib"])
        print(
            f"memory: {size} px ({report['totals']['tiles']} tiles): rank peak RSS "
            f"{rows[size]:.3f} GiB, command {wall:.1f} s (image made in {made:.1f} s)"
        )
        (img.path if isinstance(img.path, Path) else Path(img.path)).unlink()
    print(f"memory: big / small peak RSS = {rows[a.big] / rows[a.small]:.3f}")


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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--assembly-px", type=int, default=16384)
    p.add_argument("--small", type=int, default=8192)
    p.add_argument("--big", type=int, default=40_000)
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
