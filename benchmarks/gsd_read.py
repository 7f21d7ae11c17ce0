"""The cost of ``gsd=`` resampling against a native read, for the same model tiles.

What it measures: ``benchmarks/README.md``; figures: the main README ("gsd resampling").

Every row reads the same model grid (``--size`` model pixels square, ``--tile`` px tiles, so
the same number of tiles of the same shape reaches the model) through mgpr's data path
(``TileDataset`` + the rank's DataLoader); only the file behind it changes: the same picture
written at 10 cm (native read, no ``gsd``) or finer/coarser and read with ``gsd=0.1``
(GDAL ``out_shape`` reads with the row's resampling; ``+ overviews``: the file has internal
2x/4x/... overviews, which GDAL reads instead when one matches the model grid). Rounds are
interleaved (each row once per round) and each row's best round is reported.

    uv run python benchmarks/gsd_read.py --size 4096 --tile 512 --workers 2 --repeat 3
    uv run python benchmarks/gsd_read.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mgpr.data.dataset import TileDataset
from mgpr.geo.bands import check_bands
from mgpr.geo.gsd import on_model_grid
from mgpr.geo.raster import RasterInfo, TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.run.trainer import make_dataloader
from mgpr.testimage import TestImageSpec, write_test_image

GSD = 0.1  # metres per model pixel in every row


def read_all(info: RasterInfo, tile: int, workers: int, batch: int) -> tuple[int, float]:
    """(tiles, seconds) for one pass of mgpr's loader over ``info``'s (model) grid."""
    bands = {info.path: check_bands(info, None, 3)}
    grids = {info.path: info.model_grid} if info.model_grid is not None else {}
    tiles = plan_tiles(info.path, info.height, info.width, tile, 0)
    dataset = TileDataset(tiles, TileReader(bands, tile, "uint8", grids=grids), set())
    loader = make_dataloader(dataset, batch, workers, pin_memory=False)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["image"])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="model grid side, model pixels")
    ap.add_argument("--tile", type=int, default=512, help="tile side, model pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--quick", action="store_true", help="2048 px model grid, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = 2048, 1
    # row name -> (native pixel size in m, factor, resampling, overviews)
    rows = {
        "native 10 cm (no gsd)": (0.1, 1.0, None, False),
        "5 cm, gsd=0.1 average": (0.05, 2.0, "average", False),
        "5 cm, gsd=0.1 nearest": (0.05, 2.0, "nearest", False),
        "5 cm + overviews, gsd=0.1 average": (0.05, 2.0, "average", True),
        "6.7 cm, gsd=0.1 average (x1.5)": (0.1 / 1.5, 1.5, "average", False),
        "3.3 cm, gsd=0.1 average (x3)": (0.1 / 3, 3.0, "average", False),
        "20 cm, gsd=0.1 bilinear (x0.5)": (0.2, 0.5, "bilinear", False),
    }
    print(
        f"gsd reads: {args.size} px model grid, {args.tile} px tiles, workers={args.workers}, "
        f"batch={args.batch}, best of {args.repeat} interleaved rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        infos: dict[str, RasterInfo] = {}
        for i, (name, (res, factor, resampling, overviews)) in enumerate(rows.items()):
            side = round(args.size * factor)
            spec = TestImageSpec(width=side, height=side, pixel_size=res, overviews=overviews)
            info = describe_raster(str(write_test_image(Path(tmp) / f"r{i}.tif", spec).path))
            if resampling is not None:
                info = on_model_grid(info, GSD, resampling)
            assert (info.width, info.height) == (args.size, args.size), (name, info.width)
            infos[name] = info
        best: dict[str, tuple[int, float]] = {}
        for _ in range(args.repeat):
            for name, info in infos.items():
                n, s = read_all(info, args.tile, args.workers, args.batch)
                if name not in best or s < best[name][1]:
                    best[name] = (n, s)
    base = best["native 10 cm (no gsd)"]
    for name, (n, s) in best.items():
        info = infos[name]
        mpix = info.native_width * info.native_height / s / 1e6
        print(
            f"  {name:<36} {n / s:7.1f} tiles/s  {base[1] / s:5.2f}x native  "
            f"({n} tiles; file {info.native_width} px, {mpix:6.1f} native Mpx/s)"
        )


if __name__ == "__main__":
    main()
