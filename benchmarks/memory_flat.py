"""Is a rank's memory flat in the raster's size? Peak RSS, 40,000 px vs 8,192 px, model=null.

Runs the real ``mgpr`` CLI on both generated rasters and prints the rank's and the largest
process's peak RSS and their ratio (target within 20 %; see benchmarks/README.md).

    uv run python benchmarks/memory_flat.py [--big 40000] [--small 8192] [--tile 1024]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mgpr_run import run_mgpr

from mgpr.testimage import TestImageSpec, write_test_image


def run(path: Path, a: argparse.Namespace, out: Path) -> tuple[float, float, int, float]:
    """(rank peak RSS GiB, largest process peak RSS GiB, tiles, predict tiles/s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report, _ = run_mgpr(
        [
            f"input_path={path}",
            "model=null",
            "weights=none",
            f"tile_size={a.tile}",
            "overlap=0",
            f"workers={a.workers}",
        ],
        out,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children
    totals = report["totals"]
    biggest = after / 2**20 if after > before else float("nan")  # only a new maximum shows
    return (
        float(totals["mem_peak_gib"]),
        biggest,
        int(totals["tiles"]),
        float(totals["tiles_per_s"]),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=int, default=40_000)
    p.add_argument("--small", type=int, default=8192)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mgpr-mem-") as tmp_s:
        tmp = Path(tmp_s)
        rows = {}
        # small first: ru_maxrss is a running maximum, so the big run can only raise it
        for size in (a.small, a.big):
            t = time.perf_counter()
            img = write_test_image(
                tmp / f"ortho_{size}.tif",
                TestImageSpec(width=size, height=size, block_size=512, compress="deflate"),
            )
            made = time.perf_counter() - t
            rows[size] = run(img.path, a, tmp / f"run_{size}")
            img.path.unlink()
            rank, biggest, tiles, tps = rows[size]
            print(
                f"{size:>6} px ({tiles:5d} tiles, {tps:6.1f} tiles/s; "
                f"raster made in {made:.0f} s): "
                f"rank peak RSS {rank:.3f} GiB; largest process peak {biggest:.3f} GiB",
                flush=True,
            )
    r = rows[a.big][0] / rows[a.small][0]
    print(
        f"rank peak RSS {a.big} / {a.small} = {r:.3f} (target within 20%: "
        f"{'met' if abs(r - 1) <= 0.20 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
