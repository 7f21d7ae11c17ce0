"""Data path by dtype: uint8 3-band vs uint16 4-band tiles, and the device-side scaling.

What it measures: ``benchmarks/README.md``; figures: the main README ("Data path by dtype").

    uv run python benchmarks/dtype_path.py --size 8192 --tile 1024 --workers 2
    uv run python benchmarks/dtype_path.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mgpr.data.dataset import TileDataset
from mgpr.data.scaling import ValueScaler
from mgpr.geo.bands import check_bands
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.geo.values import ValueRange, carrier_dtype
from mgpr.run.trainer import make_dataloader
from mgpr.testimage import TestImageSpec, write_test_image


def data_path(path: str, tile: int, workers: int, batch: int) -> tuple[int, int, float]:
    """(tiles, bytes of carrier per tile, seconds) for one pass of mgpr's loader over ``path``."""
    info = describe_raster(path)
    bands = {path: check_bands(info, None, 0)}
    carrier = carrier_dtype([(path, info.dtype)])
    tiles = plan_tiles(path, info.height, info.width, tile, 0)
    dataset = TileDataset(tiles, TileReader(bands, tile, carrier.name), set())
    loader = make_dataloader(dataset, batch, workers, pin_memory=False)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["image"])
    return n, dataset.sample_bytes(), time.perf_counter() - t0


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def time_op(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> float:
    """Seconds per call (synchronised on CUDA), after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def scaling_rows(tile: int, batch: int, device: torch.device, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (batch, 3, tile, tile), dtype=torch.uint8, generator=gen)
    u16 = torch.randint(0, 10001, (batch, 4, tile, tile), dtype=torch.int32, generator=gen)
    u8, u16 = u8.to(device), u16.to(torch.uint16).to(device)
    s2 = ValueRange((0.0,) * 4, (10000.0,) * 4, "value_range", (1.0,) * 4, (0.0,) * 4)
    default, sentinel = ValueScaler(), ValueScaler({"s2.tif": s2})
    rows = {
        "before: x.float().div_(255), uint8 3-band": lambda: u8.to(torch.float32).div_(255.0),
        "ValueScaler uint8 3-band [0,255]": lambda: default(u8),
        "ValueScaler uint16 4-band [0,10000]": lambda: sentinel(u16),
    }
    for name, fn in rows.items():
        s = time_op(fn, device, reps)
        print(f"  {device.type:<4} {name:<44} {s * 1e3:8.2f} ms per batch of {batch}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="raster side, pixels")
    ap.add_argument("--tile", type=int, default=1024, help="tile side, pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2048 px raster, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeat = 2048, 1
    print(
        f"data path: {args.size} px raster, {args.tile} px tiles, workers={args.workers}, "
        f"batch={args.batch}, best of {args.repeat}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            "uint8 3-band": TestImageSpec(width=args.size, height=args.size, bands=3),
            "uint16 4-band": TestImageSpec(
                width=args.size, height=args.size, bands=4, dtype="uint16"
            ),
        }
        for name, spec in specs.items():
            path = str(write_test_image(Path(tmp) / f"{name.replace(' ', '_')}.tif", spec).path)
            runs = [
                data_path(path, args.tile, args.workers, args.batch) for _ in range(args.repeat)
            ]
            n, sample_bytes, seconds = min(runs, key=lambda r: r[2])
            print(
                f"  {name:<14} {n / seconds:7.1f} tiles/s  {n * sample_bytes / seconds / 1e6:7.1f} "
                f"MB/s  ({sample_bytes / 1e6:.1f} MB per tile in shared memory, {n} tiles)"
            )
    print(f"device-side scaling, {args.tile} px tiles:")
    torch.set_num_threads(1)  # a rank's main process; the workers have the other cores
    scaling_rows(args.tile, args.batch, torch.device("cpu"), reps=3 if args.quick else 10)
    if torch.cuda.is_available():
        scaling_rows(args.tile, args.batch, torch.device("cuda"), reps=50)


if __name__ == "__main__":
    main()
