"""The merge on 1 rank vs spread over 2 ranks by raster, at 10^6 detections.

Builds a run directory of published parts as the detection task writes them (``--rasters``
rasters, ``--n`` planted boxes in all, each box recorded by every tile it touches, so the seam
de-duplication has its real work), then times, interleaved over ``--repeat`` rounds:

* ``1 rank``: :func:`mgpr.tasks.merge.merge_run` alone (ledger, every raster's records, seam
  de-duplication, georeferencing, the writers);
* ``2 ranks``: two processes run :func:`~mgpr.tasks.merge.finalise_share` (rank 0 and rank 1 of
  2) at once, then rank 0 gathers their feature files into the layers
  (``merge_run(..., use_finalised=True)``); the figure is the wall time of both phases.

Prints per setting the best wall time of the rounds, the finalise and gather phases, and the
speed-up. The processes are started before the clock (imports excluded), like ranks that exist.

    uv run python benchmarks/merge_ranks.py [--n 1000000] [--rasters 4] [--format parquet]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from synthetic import raster_header

from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import Tile, plan_tiles
from mgpr.models.base import Detections
from mgpr.outputs.parts import PartWriter
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome
from mgpr.tasks.merge import finalise_share, merge_run

TILE, OVERLAP, GSD = 512, 64, 0.1
WKT = 'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",15],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1],AUTHORITY["EPSG","32633"]]'  # noqa: E501


def _raster(index: int, side: int) -> RasterInfo:
    transform = Affine(GSD, 0, 500_000.0 + index * side * GSD, 0, -GSD, 5_800_000.0)
    return raster_header(f"/data/orthos/block_{index:02d}.tif", side, transform, WKT)


def _tile_outcomes(
    tiles: list[Tile], boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> list[TileOutcome]:
    """Every box in every tile it touches, clipped to the tile, in tile pixels."""
    outs = []
    for t in tiles:
        x0, y0 = t.col_off, t.row_off
        inside = (
            (boxes[:, 2] > x0)
            & (boxes[:, 0] < x0 + t.width)
            & (boxes[:, 3] > y0)
            & (boxes[:, 1] < y0 + t.height)
        )
        b = boxes[inside] - np.array([x0, y0, x0, y0], np.float64)
        b = np.clip(b, 0, TILE).astype(np.float32)
        rec = Detections(b, scores[inside], labels[inside])
        outs.append(TileOutcome(t, 0, "", rec))
    return outs


def build_run(run: Path, n: int, n_rasters: int, seed: int = 0) -> tuple[TaskContext, list[Tile]]:
    """Published parts of ``n`` boxes over ``n_rasters`` rasters (one part per 256 tiles)."""
    rng = np.random.default_rng(seed)
    per = n // n_rasters
    side = int(np.ceil(np.sqrt(per))) * 40  # one object per 40 x 40 px cell
    infos = [_raster(i, side) for i in range(n_rasters)]
    ctx = TaskContext({i.path: i for i in infos}, TILE, OVERLAP, ("tree", "car", "building"))
    task = get_task("detection")
    writer = PartWriter(run, 0, lambda outs, sink: task.write_payload(outs, ctx, sink))
    all_tiles: list[Tile] = []
    for info in infos:
        k = np.arange(per)
        cells = side // 40
        x = (k % cells) * 40.0 + rng.uniform(0, 10, per)
        y = (k // cells) * 40.0 + rng.uniform(0, 10, per)
        w, h = rng.uniform(15, 30, per), rng.uniform(15, 30, per)
        boxes = np.stack([x, y, x + w, y + h], 1)
        scores = rng.uniform(0.3, 1.0, per).astype(np.float32)
        labels = rng.integers(0, 3, per).astype(np.int64)
        tiles = plan_tiles(info.path, side, side, TILE, OVERLAP)
        all_tiles += tiles
        row_of = np.array([t.row_off for t in tiles])
        for start in range(0, len(tiles), 256):
            chunk = tiles[start : start + 256]
            lo, hi = row_of[start], row_of[start + len(chunk) - 1] + TILE
            near = (boxes[:, 3] > lo) & (boxes[:, 1] < hi)
            writer.publish(_tile_outcomes(chunk, boxes[near], scores[near], labels[near]))
    return ctx, all_tiles


def _rank(args: tuple[Path, TaskContext, list[Tile], int, int, Any, Any]) -> None:
    run, ctx, tiles, rank, world, go, done = args
    task = get_task("detection")
    while True:
        go.wait()
        cpu = time.process_time()
        finalise_share(run, task, ctx, tiles, rank, world)
        go.clear()  # before telling rank 0: it sets go again only after done
        done.put(time.process_time() - cpu)


def main() -> None:
    """Build the parts once, then time both settings in interleaved rounds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="planted boxes in all")
    p.add_argument("--rasters", type=int, default=4, help="rasters they are spread over")
    p.add_argument("--format", default="parquet", help="output_format: gpkg, parquet or both")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds (best kept)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mgpr-merge-ranks-") as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        ctx, tiles = build_run(run, a.n, a.rasters)
        print(f"parts built in {time.perf_counter() - t0:.1f} s: {len(tiles)} tiles")
        task = get_task("detection")
        import pyogrio.raw  # noqa: F401  (what the merge imports lazily, before the ranks fork)
        import scipy.sparse.csgraph  # noqa: F401
        import shapely  # noqa: F401
        import torchvision.ops  # noqa: F401

        ctxs = mp.get_context("fork")
        go, done = ctxs.Event(), ctxs.Queue()
        helper = ctxs.Process(target=_rank, args=((run, ctx, tiles, 1, 2, go, done),))
        helper.start()
        wall: dict[str, list[float]] = {"1 rank": [], "2 ranks": []}
        cpu: dict[str, list[float]] = {"1 rank": [], "2 ranks": []}
        phases: list[tuple[float, float, float, float]] = []
        records = 0
        for _ in range(a.repeat):
            t, c = time.perf_counter(), time.process_time()
            res = merge_run(run, task, ctx, tiles, output_format=a.format)
            wall["1 rank"].append(time.perf_counter() - t)
            cpu["1 rank"].append(time.process_time() - c)
            records = res.records
            t, c = time.perf_counter(), time.process_time()
            go.set()  # rank 1 finalises its share while rank 0 does its own
            finalise_share(run, task, ctx, tiles, 0, 2)
            cpu0 = time.process_time() - c
            cpu1 = done.get()
            mid, c = time.perf_counter(), time.process_time()
            res2 = merge_run(run, task, ctx, tiles, output_format=a.format, use_finalised=True)
            end = time.perf_counter()
            gather_cpu = time.process_time() - c
            assert res2.records == records and res2.layers == res.layers
            wall["2 ranks"].append(end - t)
            cpu["2 ranks"].append(max(cpu0, cpu1) + gather_cpu)  # the critical path in CPU s
            phases.append((mid - t, cpu0, cpu1, gather_cpu))
        helper.terminate()
        print(f"{records} features after seam de-duplication, output_format={a.format}")
        for name in wall:
            print(
                f"{name:8s} merge wall {min(wall[name]):6.1f} s, "
                f"critical-path CPU {min(cpu[name]):6.1f} s"
            )
        fin, c0, c1, g = min(phases)
        print(
            f"2 ranks: finalise wall {fin:.1f} s (CPU rank 0 {c0:.1f} s, rank 1 {c1:.1f} s), "
            f"gather CPU {g:.1f} s"
        )
        print(
            f"speed-up 2 ranks / 1 rank: wall {min(wall['1 rank']) / min(wall['2 ranks']):.2f}x, "
            f"critical-path CPU {min(cpu['1 rank']) / min(cpu['2 ranks']):.2f}x "
            "(what two free cores give; wall needs them)"
        )


if __name__ == "__main__":
    main()
