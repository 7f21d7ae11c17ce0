"""What ``aoi=`` costs before the first batch: placing the area on a raster and keeping its tiles.

What it measures: ``benchmarks/README.md``; figures: the main README ("Area of interest").

Every rank plans its tiles itself, so this runs on every rank at start-up. A synthetic raster
header (no pixels: ``--size`` px square, UTM 33N, 10 cm) is tiled with ``--tile`` px tiles,
and an area of ``--vertices`` vertices (a wavy ring with a hole, about half the raster, saved
in EPSG:4326 as a GeoPackage) is read (``read_aoi``), placed on the raster (``on_aoi``: clip,
densify, reproject, pixel frame) and used to plan the tiles (``tiles_in_aoi``: the grid's boxes
tested in arrays, only kept tiles built); the whole plan (``plan_tiles``) is timed for
comparison. Best of ``--repeat``.

    uv run python benchmarks/aoi_plan.py --size 100000 --tile 128 --vertices 20000
    uv run python benchmarks/aoi_plan.py --quick
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from pyogrio.raw import write as write_vector
from pyproj import Transformer
from synthetic import best_of, raster_header

from mgpr.geo.aoi import on_aoi, read_aoi, tiles_in_aoi
from mgpr.geo.raster import RasterInfo
from mgpr.geo.tiling import plan_tiles

CRS = "EPSG:32633"


def header(size: int) -> RasterInfo:
    """A raster header of ``size`` px square (nothing on disk: the plan needs none)."""
    from pyproj import CRS as ProjCRS

    transform = Affine(0.1, 0, 500_000, 0, -0.1, 5_000_000)
    return raster_header("synthetic.tif", size, transform, ProjCRS.from_user_input(CRS).to_wkt())


def write_area(path: Path, info: RasterInfo, vertices: int) -> None:
    """A wavy ring with a hole over about half the raster, in EPSG:4326."""
    angle = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
    size = info.width
    radius = size * (0.38 + 0.04 * np.sin(angle * 40))
    ring = np.column_stack([size / 2 + radius * np.cos(angle), size / 2 + radius * np.sin(angle)])
    hole = shapely.Point(size / 2, size / 2).buffer(size * 0.1, 64)
    pixel = shapely.Polygon(ring, holes=[hole.exterior.coords])
    t = info.transform
    geom = shapely.affinity.affine_transform(pixel, [t.a, t.b, t.d, t.e, t.c, t.f])
    tr = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    geom = shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    write_vector(
        path,
        np.array([shapely.to_wkb(geom)], dtype=object),
        [],
        fields=[],
        geometry_type="Polygon",
        crs="EPSG:4326",
        driver="GPKG",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000, help="raster edge, px")
    ap.add_argument("--tile", type=int, default=128, help="tile edge, px")
    ap.add_argument("--vertices", type=int, default=20_000, help="vertices of the area's ring")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10,000 px, 512 px tiles, 2,000 vertices")
    args = ap.parse_args()
    if args.quick:
        args.size, args.tile, args.vertices, args.repeat = 10_000, 512, 2_000, 1
    info = header(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "area.gpkg"
        write_area(path, info, args.vertices)
        t_read, aoi = best_of(lambda: read_aoi(str(path)), args.repeat)
        t_place, placed = best_of(lambda: on_aoi([info], aoi), args.repeat)  # type: ignore[arg-type]
    [placed_info] = placed  # type: ignore[misc]
    t_plan, plan = best_of(
        lambda: plan_tiles(info.path, info.height, info.width, args.tile, 0), args.repeat
    )
    t_keep, (kept, _) = best_of(  # type: ignore[misc]
        lambda: tiles_in_aoi(placed_info, args.tile, 0), args.repeat
    )
    n_plan, n_kept = len(plan), len(kept)  # type: ignore[arg-type]
    print(
        f"raster {args.size} px, {args.tile} px tiles: {n_plan} planned; area of "
        f"{args.vertices} vertices keeps {n_kept} ({100 * n_kept / n_plan:.0f} %)"
    )
    print(f"  read_aoi      {t_read * 1000:8.1f} ms")
    print(f"  on_aoi        {t_place * 1000:8.1f} ms  (clip, densify, reproject, pixel frame)")
    print(f"  plan_tiles    {t_plan * 1000:8.1f} ms  (the plan without aoi, for comparison)")
    print(f"  tiles_in_aoi  {t_keep * 1000:8.1f} ms  (the plan with aoi: kept tiles only)")


if __name__ == "__main__":
    main()
