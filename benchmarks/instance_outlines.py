"""What an instance segmenter's masks cost per tile: cropping them, and tracing the outlines.

For a tile of ``--tile`` px with ``--objects`` objects (discs of 8-40 px radius, as tree crowns
are at 10 cm), it times, on this CPU:

* ``instance_masks``: (N, 1, H, W) float masks (what torchvision's Mask R-CNN pastes onto the
  tile) -> one bool crop per object (the work of a run's postprocess on the CPU; on a GPU the
  windows are found on the device and only the bool masks cross);
* ``mask_outline``: each crop -> its WKB outline in raster pixels, one polygonize per object;
* ``tile_outlines``: the same outlines as the rank's part writer thread makes them (above
  ``SHARED_TRACE_OBJECTS`` objects: a polygonize per label image of disjoint masks).

    uv run python benchmarks/instance_outlines.py [--tile 512] [--objects 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import instance_masks
from mgpr.tasks.detection import mask_outline, tile_outlines


def main() -> None:
    """Time both steps for one tile's objects; print ms per tile and per object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[: args.tile, : args.tile]
    masks = torch.zeros(args.objects, 1, args.tile, args.tile)
    for i in range(args.objects):
        r, c = rng.uniform(0, args.tile, 2)
        radius = rng.uniform(8, 40)
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
        masks[i, 0] = torch.from_numpy(disc.astype(np.float32) * 0.9)
    tile = plan_tiles("t.tif", args.tile * 4, args.tile * 4, args.tile, 0)[5]
    crop_s, trace_s, shared_s = [], [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        crops = instance_masks(masks)
        crop_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        outlines = [mask_outline(c, tile) for c in crops]
        trace_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        shared = tile_outlines(crops, tile)
        shared_s.append(time.perf_counter() - start)
    assert all(o is not None for o in outlines) and len(shared) == len(outlines)
    pixels = sum(int(c.mask.sum()) for c in crops)
    for name, times in (
        ("crop (instance_masks)", crop_s),
        ("trace each crop", trace_s),
        ("trace (tile_outlines)", shared_s),
    ):
        best = min(times)
        print(
            f"{name:22s} {best * 1e3:8.1f} ms per tile of {args.objects} objects "
            f"({best * 1e3 / args.objects:.3f} ms each; median of {args.repeat} runs "
            f"{np.median(times) * 1e3:.1f} ms)"
        )
    print(f"{args.tile} px tile, {args.objects} objects, {pixels} object pixels in all")


if __name__ == "__main__":
    main()
