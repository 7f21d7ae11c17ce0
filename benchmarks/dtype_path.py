"""Data path by dtype: uint8 3-band vs uint16 4-band tiles, the nodata mask, device-side scaling.

The mask rows read the same nodata raster (a nodata-value border, or an internal mask) twice:
with its validity mask, as a run does, and without (the image alone), so their ratio is the
data-path cost of the mask read (GDAL's dataset mask + 1 byte per pixel in shared memory).

What it measures: ``benchmarks/README.md``; figures: the main README ("Data path by dtype").

    uv run python benchmarks/dtype_path.py --size 8192 --tile 1024 --workers 2
    uv run python benchmarks/dtype_path.py --quick
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mgpr.data.clipping import ClipTally
from mgpr.data.dataset import TileDataset
from mgpr.data.masking import fill_invalid
from mgpr.data.scaling import ValueScaler
from mgpr.geo.bands import check_bands
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.geo.values import ValueRange, carrier_dtype
from mgpr.run.trainer import make_dataloader
from mgpr.testimage import TestImageSpec, write_test_image


def data_path(
    path: str, tile: int, workers: int, batch: int, mask: bool = False
) -> tuple[int, int, float]:
    """(tiles, bytes per tile in shared memory, seconds) for one pass of mgpr's loader.

    ``mask``: read each tile's validity mask too (what a run does for a raster with nodata).
    """
    info = describe_raster(path)
    bands = {path: check_bands(info, None, 0)}
    carrier = carrier_dtype([(path, info.dtype)])
    tiles = plan_tiles(path, info.height, info.width, tile, 0)
    masked = {path} if mask else set()
    dataset = TileDataset(tiles, TileReader(bands, tile, carrier.name), masked)
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
    mask = torch.full((batch, tile, tile), 255, dtype=torch.uint8, device=device)
    mask[:, :, : tile // 8] = 0  # a nodata strip

    def tallied(valid: torch.Tensor | None) -> torch.Tensor:
        """What a run does: the counts before the clamp, each raster's peak after it."""
        tally = ClipTally()
        scaled = sentinel(u16, before_clamp=lambda x: tally.add(x, valid))
        tally.add_peaks(scaled, None)
        return scaled

    rows = {
        "before: x.float().div_(255), uint8 3-band": lambda: u8.to(torch.float32).div_(255.0),
        "ValueScaler uint8 3-band [0,255]": lambda: default(u8),
        "ValueScaler uint16 4-band [0,10000]": lambda: sentinel(u16),
        # what a run adds: the clamp's valid values below lo / above hi, counted on the device
        "  + clip tally (no mask)": lambda: tallied(None),
        "  + clip tally (nodata mask)": lambda: tallied(mask),
    }
    x = default(u8)
    rows["fill_invalid uint8 3-band (after scaling)"] = lambda: fill_invalid(x, mask)
    for name, fn in rows.items():
        s = time_op(fn, device, reps)
        print(f"  {device.type:<4} {name:<44} {s * 1e3:8.2f} ms per batch of {batch}")


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, once joined)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def mask_rows(tmp: Path, args: argparse.Namespace) -> None:
    """uint8 3-band with a nodata border: the same file with vs without its mask, interleaved.

    Prints tiles/s (best pass) and CPU-ms per tile of every process (median pass): on a shared
    machine the CPU time per tile moves far less with the load than the wall time.
    """
    repeat = max(args.repeat, 5)
    print(
        f"nodata mask ({args.tile} px tiles, uint8 3-band, nodata=border, same file each, "
        f"{repeat} interleaved passes):"
    )
    for mode in ("value", "mask"):
        spec = TestImageSpec(width=args.size, height=args.size, nodata="border", nodata_mode=mode)
        path = str(write_test_image(tmp / f"nodata_{mode}.tif", spec).path)
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeat):  # interleaved: a load change hits both alike
            for with_mask in (False, True):
                c = cpu_seconds()
                n, _, s = data_path(path, args.tile, args.workers, args.batch, with_mask)
                cpu[with_mask].append((cpu_seconds() - c) / n * 1e3)
                wall[with_mask].append(s)
        rate = {k: n / min(v) for k, v in wall.items()}
        ms = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            f"  nodata_mode={mode:<5} image only {rate[False]:6.1f} tiles/s {ms[False]:6.1f} "
            f"CPU-ms/tile; with mask {rate[True]:6.1f} tiles/s {ms[True]:6.1f} CPU-ms/tile "
            f"(CPU x{ms[True] / ms[False]:.2f}, {n} tiles)"
        )


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
        mask_rows(Path(tmp), args)
    print(f"device-side scaling, {args.tile} px tiles:")
    torch.set_num_threads(1)  # a rank's main process; the workers have the other cores
    scaling_rows(args.tile, args.batch, torch.device("cpu"), reps=3 if args.quick else 10)
    if torch.cuda.is_available():
        scaling_rows(args.tile, args.batch, torch.device("cuda"), reps=50)


if __name__ == "__main__":
    main()
