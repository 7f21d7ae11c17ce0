"""A folder of many small inputs (image chips): the headers before the first tile, and whole runs.

Writes ``--n`` chips of ``--size`` px (3-band uint8 GeoTIFFs on a UTM grid, side by side as a
chip dataset's are, ``--objects`` bright squares each for the reference detector to find;
written with rasterio directly: the test-image generator takes ~9 ms a file), then:

* headers: :func:`mgpr.geo.raster.describe_raster` over every chip in this process against
  :func:`mgpr.geo.headers.describe_rasters` (a forked pool, one process per usable CPU),
  interleaved over ``--repeat`` rounds, best kept: ms per input and the ratio;
* ``--run``: the whole ``mgpr`` command (``model=reference``, one tile per chip, ``workers=1``,
  ``previews=none``) on 1 rank and on ``--ranks`` CPU ranks (Lightning's launcher): wall
  seconds, the prediction loop and the rest (start-up + merge) from summary.json, then the
  same command again: a resume of the finished run, start-up and the merge alone.

    uv run python benchmarks/many_inputs.py [--n 5000] [--size 64] [--objects 3] [--run]
        [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from mgpr_run import run_mgpr
from rasterio.transform import from_origin

from mgpr.geo.headers import describe_processes, describe_rasters, usable_cpus
from mgpr.geo.raster import describe_raster


def write_chips(folder: Path, n: int, size: int, objects: int) -> list[str]:
    """``n`` chips of ``size`` px, 10 cm pixels, 300 to a row, ``objects`` bright squares each.

    The background stays below the reference detector's threshold (< 200 of 255), so every
    chip has exactly ``objects`` boxes (squares of size // 8 px on a diagonal, apart).
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 200, (3, size, size), dtype=np.uint8)
    side = max(2, size // 8)
    for k in range(objects):
        at = (2 * k + 1) * side
        if at + side > size:
            raise SystemExit(f"--objects {objects} squares of {side} px do not fit {size} px")
        data[:, at : at + side, at : at + side] = 250
    paths = []
    for i in range(n):
        x0 = 500_000.0 + (i % 300) * size * 0.1
        y0 = 5_000_000.0 - (i // 300) * size * 0.1
        path = folder / f"chip{i:06d}.tif"
        with rasterio.open(
            path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
            crs="EPSG:32633", transform=from_origin(x0, y0, 0.1, 0.1),
        ) as dst:  # fmt: skip
            dst.write(data)
        paths.append(str(path))
    return paths


def time_headers(paths: list[str], repeat: int) -> None:
    n = describe_processes(len(paths))
    best = {"serial": float("inf"), "pool": float("inf")}
    for _ in range(repeat):
        for name in best:
            t0 = time.perf_counter()
            if name == "serial":
                [describe_raster(p) for p in paths]
            else:
                describe_rasters(paths)
            best[name] = min(best[name], time.perf_counter() - t0)
    print(f"headers of {len(paths)} inputs, {usable_cpus()} usable CPU(s), pool of {n}:")
    for name, s in best.items():
        print(f"  {name:<7} {s:7.2f} s  {1000 * s / len(paths):6.3f} ms/input")
    print(f"  pool / serial speed-up: {best['serial'] / best['pool']:.2f}x")


def time_runs(folder: Path, size: int, ranks: int, work: Path) -> None:
    print("whole command (model=reference, workers=1, previews=none), then a resume of it")
    print("(start-up + the merge again, 0 tiles predicted):")
    for gpus in (1, ranks):
        out = work / f"run{gpus}"
        overrides = [
            f"input_path={folder}",
            "model=reference",
            f"tile_size={size}",
            "batch_size=64",
            "workers=1",
            "previews=none",
            f"gpus={gpus}",
            "accelerator=cpu",
        ]
        _, wall = run_mgpr(overrides, out)
        s = json.loads((out / "summary.json").read_text())
        loop = float(s["predict_loop_s"])
        _, again = run_mgpr(overrides, out)
        print(
            f"  {gpus} rank(s): {wall:6.1f} s whole, prediction loop {loop:5.1f} s, "
            f"start-up + merge {wall - loop:5.1f} s, {s['tiles_predicted']} tiles, "
            f"{s['records']} boxes; resume {again:5.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="chips")
    parser.add_argument("--size", type=int, default=64, help="chip edge, px")
    parser.add_argument("--objects", type=int, default=3, help="bright squares per chip")
    parser.add_argument("--repeat", type=int, default=2, help="header rounds (best kept)")
    parser.add_argument("--run", action="store_true", help="also time whole mgpr commands")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks of the second run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = write_chips(work / "chips", args.n, args.size, args.objects)
        print(
            f"wrote {args.n} chips of {args.size} px, {args.objects} objects each, "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        time_headers(paths, args.repeat)
        if args.run:
            time_runs(work / "chips", args.size, args.ranks, work)


if __name__ == "__main__":
    main()
