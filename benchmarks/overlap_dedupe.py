"""What the de-duplication between overlapping inputs costs the merge (rank 0, one layer).

What it measures: ``benchmarks/README.md``; figures: the main README ("predictions.gpkg").

Two cases of synthetic detections (no model, no files: headers and feature batches as the merge
holds them), each timed through ``dedupe_across_inputs`` (best of ``--repeat``):

* ``sheets``: ``--inputs`` north-up rasters in one CRS laid side by side, each sharing a
  ``--margin`` px strip with its east neighbour, ``--boxes`` boxes per raster spread evenly
  (those in a strip found by both neighbours: the duplicates the pass removes);
* ``apart``: the same rasters with gaps between them: the pass only tests footprints.

    uv run python benchmarks/overlap_dedupe.py --inputs 16 --boxes 60000 --margin 200
    uv run python benchmarks/overlap_dedupe.py --quick
"""

from __future__ import annotations

import argparse

import numpy as np
from affine import Affine
from pyproj import CRS
from synthetic import best_of, raster_header

from mgpr.geo.georef import boxes_to_rings
from mgpr.geo.raster import RasterInfo
from mgpr.outputs.vector import FeatureBatch
from mgpr.tasks.overlap_dedupe import dedupe_across_inputs

SIZE = 10_000  # px per raster side
WKT = CRS.from_epsg(32633).to_wkt()


def header(i: int, x0: float) -> RasterInfo:
    return raster_header(f"r{i}.tif", SIZE, Affine(0.1, 0, x0, 0, -0.1, 5_000_000), WKT)


def layer(inputs: int, boxes: int, step_px: int, seed: int) -> tuple[list, list]:  # type: ignore[type-arg]
    """Rasters every ``step_px`` px eastwards over one ground grid of 8 px objects.

    A raster holds the objects wholly inside it, so a shared strip's objects are in both.
    """
    rng = np.random.default_rng(seed)
    spacing = max(16, round(SIZE / np.sqrt(boxes)))
    ys = np.arange(spacing / 2, SIZE - 8, spacing)
    xs = np.arange(spacing / 2, step_px * (inputs - 1) + SIZE - 8, spacing)
    rasters, batches = [], []
    for i in range(inputs):
        x0 = i * step_px
        info = header(i, 500_000 + x0 * 0.1)
        mine = xs[(xs >= x0) & (xs + 8 <= x0 + SIZE)] - x0
        cols, rows = (a.ravel() for a in np.meshgrid(mine, ys))
        px = np.column_stack([cols, rows, cols + 8, rows + 8])
        fields = {
            "score": rng.random(len(px)),
            "class_id": np.ones(len(px), np.int64),
            "px_xmin": px[:, 0],
            "px_ymin": px[:, 1],
            "px_xmax": px[:, 2],
            "px_ymax": px[:, 3],
        }
        rasters.append(info)
        batches.append(FeatureBatch(boxes_to_rings(px, info.transform), fields))
    return rasters, batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--boxes", type=int, default=60_000, help="boxes per input")
    ap.add_argument("--margin", type=int, default=200, help="px shared by neighbours")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 inputs of 10,000 boxes, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.inputs, args.boxes, args.repeat = 4, 10_000, 1
    for name, step in (("sheets", SIZE - args.margin), ("apart", SIZE + 1000)):
        rasters, batches = layer(args.inputs, args.boxes, step, seed=1)
        total = sum(len(b) for b in batches)
        seconds, (_, removed) = best_of(  # type: ignore[misc]
            lambda rasters=rasters, batches=batches: dedupe_across_inputs(
                batches, rasters, WKT, 0.5, 0.5
            ),
            args.repeat,
        )
        print(
            f"{name:7s} {args.inputs} inputs x {args.boxes} boxes ({total} in the layer): "
            f"{seconds:.3f} s, {removed} removed ({seconds / total * 1e6:.2f} us per box)"
        )


if __name__ == "__main__":
    main()
