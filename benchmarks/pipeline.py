"""Where does a tile's time go? mgpr's data path, model and whole run against their limits.

Seven rows on one generated raster (read limit, mgpr's loader, a naive loader, TorchGeo, model
compute alone, the whole run, the whole run with model=null); benchmarks/README.md explains each
row and how "whole run / compute alone" is computed.

    uv run --extra bench python benchmarks/pipeline.py --size 8192 --tile 1024 --workers 2
    uv run python benchmarks/pipeline.py --quick        # small smoke run (about a minute)
    uv run --extra bench python benchmarks/pipeline.py --gpu   # on a GPU machine (sweeps batch)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rasterio
import torch
from mgpr_run import mgpr_command, run_mgpr
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset

from mgpr.data.dataset import TileDataset
from mgpr.data.scaling import ValueScaler
from mgpr.geo.bands import check_bands
from mgpr.geo.raster import TileReader, describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models import build_model
from mgpr.run.precision import cpu_has_fast_bf16
from mgpr.run.trainer import make_dataloader
from mgpr.testimage import TestImageResult, TestImageSpec, write_test_image

RESULTS: dict[str, Any] = {"rows": {}, "ratios": {}, "skipped": {}}


def line(key: str, text: str, **values: Any) -> None:
    """Print one measurement and keep it for --out."""
    print(f"{key:<34} {text}", flush=True)
    RESULTS["rows"][key] = values


def skip(key: str, reason: str) -> None:
    print(f"{key:<34} SKIPPED: {reason}", flush=True)
    RESULTS["skipped"][key] = reason


def cpu_name() -> str:
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                return raw.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------ loaders
def read_limit(path: str, tile: int) -> int:
    """Block-aligned windowed reads, one process, uint8; returns tiles read."""
    n = 0
    with rasterio.open(path) as src:
        for row in range(0, src.height, tile):
            for col in range(0, src.width, tile):
                h, w = min(tile, src.height - row), min(tile, src.width - col)
                src.read(window=Window(col, row, w, h), out_dtype="uint8")
                n += 1
    return n


def drain(loader: Any, key: str = "image") -> int:
    n = 0
    for batch in loader:
        n += len(batch[key])
    return n


def mgpr_loader(path: str, tile: int, workers: int, batch: int) -> DataLoader[Any]:
    """mgpr's own dataset and DataLoader, as a CPU rank builds them (no pinning)."""
    info = describe_raster(path)
    bands = {path: check_bands(info, None, 3)}
    tiles = plan_tiles(path, info.height, info.width, tile, 0)
    dataset = TileDataset(tiles, TileReader(bands, tile), {path} if info.has_mask else set())
    return make_dataloader(dataset, batch, workers, pin_memory=False)


class NaiveDataset(Dataset[dict[str, Any]]):
    """What users write first: open per item, float32 / 255 on the CPU."""

    def __init__(self, path: str, tile: int) -> None:
        self.path = path
        self.tile = tile
        with rasterio.open(path) as src:
            self.windows = [
                Window(c, r, tile, tile)
                for r in range(0, src.height, tile)
                for c in range(0, src.width, tile)
            ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with rasterio.open(self.path) as src:
            arr = src.read(window=self.windows[i], boundless=True, fill_value=0)
        return {"image": torch.from_numpy(arr).float() / 255.0}


def naive_loader(path: str, tile: int, workers: int, batch: int) -> DataLoader[Any]:
    return DataLoader(NaiveDataset(path, tile), batch_size=batch, num_workers=workers)


def torchgeo_loader(path: str, tile: int, workers: int, batch: int) -> DataLoader[Any]:
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler, Units

    class Ortho(RasterDataset):  # type: ignore[misc]
        filename_glob = Path(path).name
        is_image = True

    dataset = Ortho(paths=[path])
    sampler = GridGeoSampler(dataset, size=tile, stride=tile, units=Units.PIXELS)
    return DataLoader(
        dataset, sampler=sampler, batch_size=batch, num_workers=workers, collate_fn=stack_samples
    )


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers once joined)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """(wall s, CPU s of every process involved, tiles) of one run of ``fn``."""
    c, t = cpu_seconds(), time.perf_counter()
    n = fn()
    return time.perf_counter() - t, cpu_seconds() - c, n


def loader_rows(
    path: str, tile: int, workers: int, batch: int, repeat: int, skip_torchgeo: bool
) -> dict[str, float]:
    """Rows 1-4 at one tile size; returns tiles/s by row name."""
    mb_per_tile = 3 * tile * tile / 1e6  # decoded uint8 bytes
    runs: dict[str, Callable[[], int]] = {
        "read_limit": lambda: read_limit(path, tile),
        "mgpr_data": lambda: drain(mgpr_loader(path, tile, workers, batch)),
        "naive": lambda: drain(naive_loader(path, tile, workers, batch)),
    }
    if skip_torchgeo:
        skip(f"torchgeo@{tile}", "--skip-torchgeo")
    else:
        try:
            import torchgeo.datasets  # noqa: F401
            import torchgeo.samplers  # noqa: F401

            runs["torchgeo"] = lambda: drain(torchgeo_loader(path, tile, workers, batch))
        except ImportError as exc:
            skip(
                f"torchgeo@{tile}",
                f"torchgeo is not installed ({exc}); run with `uv run --extra bench ...`",
            )
    best: dict[str, float] = {k: float("inf") for k in runs}
    cpu: dict[str, float] = {k: float("inf") for k in runs}
    count: dict[str, int] = {}
    for _ in range(repeat):  # interleaved, so a noisy neighbour hits every row alike
        for name, fn in runs.items():
            seconds, cpu_s, count[name] = timed(fn)
            best[name] = min(best[name], seconds)
            cpu[name] = min(cpu[name], cpu_s)
    labels = {
        "read_limit": "1 read limit (1 process)",
        "mgpr_data": f"2 mgpr data path (w={workers})",
        "naive": f"3 naive loader (w={workers})",
        "torchgeo": f"4 torchgeo (w={workers})",
    }
    out: dict[str, float] = {}
    for name, seconds in best.items():
        tps = count[name] / seconds
        out[name] = tps
        ms = 1000 * cpu[name] / count[name]
        out[f"{name}_cpu_ms"] = ms
        line(
            f"{labels[name]} @{tile}px",
            f"{tps:8.1f} tiles/s  {tps * mb_per_tile:8.1f} MB/s "
            f"decoded  {ms:6.2f} CPU-ms/tile  ({count[name]} tiles, best of {repeat}: "
            f"{seconds:.2f} s)",
            tiles_per_s=tps,
            mb_per_s=tps * mb_per_tile,
            cpu_ms_per_tile=ms,
            tiles=count[name],
            seconds=seconds,
        )
    return out


# ------------------------------------------------------------------ models
def raster_batch(path: str, tile: int, batch: int) -> torch.Tensor:
    """The raster's first ``batch`` tiles as (B, 3, tile, tile) uint8 (cycled if fewer).

    Compute alone runs on the same pixels as the whole run: a detector's cost depends on the
    image (proposals, boxes kept), so random noise would not be a fair comparison.
    """
    info = describe_raster(path)
    tiles = plan_tiles(path, info.height, info.width, tile, 0)
    reader = TileReader({path: check_bands(info, None, 3)}, tile)
    images = [torch.from_numpy(reader.read(tiles[i % len(tiles)])) for i in range(batch)]
    reader.close()
    return torch.stack(images)


def compute_alone(name: str, tile: int, batch: int, seconds: float, bf16: bool, path: str) -> float:
    """Tiles/s of prepare + forward on a device-resident uint8 batch of ``path``'s tiles.

    Postprocess (box decoding, NMS) is part of torchvision's detection forward, so for
    fasterrcnn it is included; mgpr's own postprocess (to numpy records) and writing are not.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = build_model(name, "none", tile_size=tile)
    adapter.module.to(device)
    if bf16:
        adapter.module.to(memory_format=torch.channels_last)
    x = raster_batch(path, tile, batch).to(device)
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def step() -> None:
        with torch.inference_mode(), ctx():
            adapter.forward(adapter.prepare(ValueScaler()(x)))
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, oneDNN/cuDNN kernel choice)
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += batch
        if time.perf_counter() - start >= seconds:
            break
    return n / (time.perf_counter() - start)


def benchmark_raster(path: Path, size: int, pixel_size: float) -> TestImageResult:
    """A ``size`` x ``size`` RGB orthomosaic as drones deliver them: DEFLATE, 512 px blocks."""
    spec = TestImageSpec(
        width=size, height=size, block_size=512, compress="deflate", pixel_size=pixel_size
    )
    return write_test_image(path, spec)


def whole_run(
    path: str, model: str, tile: int, workers: int, batch: int, out: Path
) -> dict[str, Any]:
    """Run the real CLI; returns predict-loop and end-to-end figures."""
    t0 = time.time()
    report, wall = run_mgpr(
        [
            f"input_path={path}",
            f"model={model}",
            "weights=none",
            f"tile_size={tile}",
            "overlap=0",
            f"workers={workers}",
            f"batch_size={batch}",
        ],
        out,
    )
    part = json.loads((out / "report_parts" / "rank0.json").read_text())
    totals = report["totals"]
    first = part.get("first_batch_unix_s")
    return {
        "tiles": totals["tiles"],
        "predict_tiles_per_s": totals["tiles_per_s"],
        # after the first batch: compute alone is timed after a warm-up step, so compare with this
        "steady_tiles_per_s": part.get("steady_tiles_per_s"),
        "predict_wall_s": totals["wall_s"],
        "data_wait_share": totals["data_wait_share"],
        "end_to_end_s": wall,
        "end_to_end_tiles_per_s": totals["tiles"] / wall,
        "startup_to_first_batch_s": (first - t0) if first else None,
        "startup_to_predict_s": (part["predict_start_unix_s"] - t0)
        if part.get("predict_start_unix_s")
        else None,
        "rss_peak_gib": totals.get("mem_peak_gib"),
    }


def fmt_run(r: dict[str, Any]) -> str:
    first = r["startup_to_first_batch_s"]
    steady = r["steady_tiles_per_s"]
    return (
        f"{r['predict_tiles_per_s']:8.2f} tiles/s predict loop, "
        + (f"{steady:.2f} after the first batch " if steady else "")
        + f"({r['tiles']} tiles, data wait "
        f"{r['data_wait_share']:.0%}); end to end {r['end_to_end_s']:.1f} s = "
        f"{r['end_to_end_tiles_per_s']:.2f} tiles/s; command -> first batch "
        + (f"{first:.1f} s" if first is not None else "n/a")
    )


# ------------------------------------------------------------------ main
def ratio(key: str, a: float | None, b: float | None, target: float | None = None) -> None:
    if not a or not b:
        print(f"  {key:<44} n/a")
        return
    r = a / b
    verdict = (
        ""
        if target is None
        else (f"  (target >= {target:.2f}: {'met' if r >= target else 'MISSED'})")
    )
    print(f"  {key:<44} {r:6.2f}x{verdict}")
    RESULTS["ratios"][key] = {"value": r, "target": target}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="loader raster edge (px)")
    p.add_argument("--tile", type=int, default=1024, help="loader tile edge (px); 512 runs too")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="loader rows and null runs")
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="model rows: comma list to sweep (default: --batch-size)",
    )
    p.add_argument("--models", default="resnet50,fasterrcnn")
    p.add_argument("--model-size", type=int, default=3072, help="raster edge for model rows (px)")
    p.add_argument("--model-tile", type=int, default=512)
    p.add_argument("--compute-seconds", type=float, default=8.0, help="timed compute per model")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per loader row")
    p.add_argument("--pixel-size", type=float, default=0.1, help="metres per pixel")
    p.add_argument("--skip-torchgeo", action="store_true")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="GPU settings: 1024 px model tiles on a 16384 px raster, batch 8,16,32, "
        "workers = cores - 2",
    )
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    a = p.parse_args()
    if a.quick:
        a.size, a.tile, a.model_size, a.compute_seconds, a.repeat = 2048, 512, 1024, 2.0, 1
        a.models = "resnet50"
        a.batch_size = min(a.batch_size, 4)
    if a.gpu:
        a.model_tile, a.model_size = 1024, 16384
        a.batch_sizes = a.batch_sizes or "8,16,32"
        a.workers = max(2, (os.cpu_count() or 4) - 2)  # leave the rank's main process a core
    batch_sizes = [int(b) for b in (a.batch_sizes or str(a.batch_size)).split(",") if b]
    models = [m for m in a.models.split(",") if m]
    tiles_at = sorted({a.tile, 512}, reverse=True)
    cores = os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu_name()}"
    print(
        f"machine: {device}; {cores} cores; load {os.getloadavg()[0]:.1f}; torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
    )
    RESULTS["machine"] = {
        "device": device,
        "cores": cores,
        "cpu": cpu_name(),
        "load_before": os.getloadavg(),
    }
    RESULTS["args"] = {k: str(v) for k, v in vars(a).items()}

    with tempfile.TemporaryDirectory(prefix="mgpr-bench-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        img = benchmark_raster(tmp / "ortho.tif", a.size, a.pixel_size)
        print(
            f"raster: {a.size}x{a.size}x3 uint8, DEFLATE, 512-px blocks, "
            f"{img.file_bytes / 1e6:.0f} MB on disk, made in {time.perf_counter() - t:.0f} s"
        )
        path = str(img.path)
        read_limit(path, a.tile)  # page cache warm for every row

        loaders: dict[int, dict[str, float]] = {}
        for tile in tiles_at:
            loaders[tile] = loader_rows(
                path, tile, a.workers, a.batch_size, a.repeat, a.skip_torchgeo
            )

        # model rows on a smaller raster (CPU models take seconds per tile)
        mt = a.model_tile
        mimg = benchmark_raster(tmp / "ortho_model.tif", a.model_size, a.pixel_size)
        mpath = str(mimg.path)
        fast_bf16 = (
            torch.cuda.is_available()
            and torch.cuda.is_bf16_supported()
            or (not torch.cuda.is_available() and cpu_has_fast_bf16())
        )
        # compute (fp32, and bf16 + channels_last where fast) and the whole run, per model and
        # batch size; the whole run uses precision=auto, so its ratio is taken against the
        # compute row at the precision auto picks (bf16 where fast, else fp32)
        auto = "bf16" if fast_bf16 else "fp32"
        compute: dict[tuple[str, int], float] = {}
        runs: dict[tuple[str, int], dict[str, Any]] = {}
        for m in models:
            for bs in batch_sizes:
                fp32 = compute_alone(m, mt, bs, a.compute_seconds, bf16=False, path=mpath)
                line(
                    f"5 compute {m} fp32 @{mt}px b{bs}",
                    f"{fp32:8.2f} tiles/s",
                    tiles_per_s=fp32,
                )
                compute[(m, bs)] = fp32
                if fast_bf16:
                    bf16 = compute_alone(m, mt, bs, a.compute_seconds, bf16=True, path=mpath)
                    line(
                        f"5 compute {m} bf16+cl @{mt}px b{bs}",
                        f"{bf16:8.2f} tiles/s ({bf16 / fp32:.2f}x fp32)",
                        tiles_per_s=bf16,
                    )
                    compute[(m, bs)] = bf16
                else:
                    skip(
                        f"5 compute {m} bf16+cl @{mt}px b{bs}",
                        "no fast bf16 here (CPU lacks avx512_bf16/amx_bf16); "
                        "precision=auto runs 32-true",
                    )
                runs[(m, bs)] = whole_run(mpath, m, mt, a.workers, bs, tmp / f"run_{m}_{bs}")
                line(f"6 whole run {m} @{mt}px b{bs}", fmt_run(runs[(m, bs)]), **runs[(m, bs)])
        null = whole_run(mpath, "null", mt, a.workers, a.batch_size, tmp / "run_null")
        line(f"7 whole run null @{mt}px", fmt_run(null), **null)
        null_big = whole_run(path, "null", mt, a.workers, a.batch_size, tmp / "run_null_big")
        line(f"7 whole run null @{mt}px {a.size}px", fmt_run(null_big), **null_big)

        demo_t = time.time()
        demo = subprocess.run(
            [*mgpr_command(), f"output_dir={tmp / 'demo'}", "progress=false"],
            capture_output=True,
            text=True,
        )
        demo_s = time.time() - demo_t
        line(
            "quick start (`mgpr` demo)",
            f"{demo_s:8.1f} s end to end (exit {demo.returncode})",
            seconds=demo_s,
            rc=demo.returncode,
        )

    print("\nratios")
    for tile in tiles_at:
        lt = loaders[tile]
        ratio(f"data path / read limit @{tile}px", lt["mgpr_data"], lt["read_limit"], 1.0)
        ratio(
            f"CPU per tile, read limit / data path @{tile}px",
            lt["read_limit_cpu_ms"],
            lt["mgpr_data_cpu_ms"],
        )
        ratio(f"data path / naive @{tile}px", lt["mgpr_data"], lt["naive"], 3.0)
        ratio(f"data path / torchgeo @{tile}px", lt["mgpr_data"], lt.get("torchgeo"), 4.0)
    for m, bs in runs:
        ratio(
            f"whole run / compute alone ({auto}) {m} @{mt}px b{bs}",
            runs[(m, bs)]["steady_tiles_per_s"],
            compute[(m, bs)],
            0.85 if torch.cuda.is_available() else 0.90,
        )
    if mt in loaders:
        ratio(
            f"null-model run / data path @{mt}px",
            null_big["predict_tiles_per_s"],
            loaders[mt]["mgpr_data"],
            0.8,
        )

    print(
        "\nplanning figures (one rank = one "
        + ("GPU" if torch.cuda.is_available() else f"CPU process with {cores} cores")
        + ")"
    )
    km2_per_tile = (mt * a.pixel_size) ** 2 / 1e6
    plan = {}
    for m in models:
        best = max(batch_sizes, key=lambda b: runs[(m, b)]["predict_tiles_per_s"])
        tps = runs[(m, best)]["predict_tiles_per_s"]
        plan[m] = {
            "batch_size": best,
            "tiles_per_s": tps,
            "megapixels_per_s": tps * mt * mt / 1e6,
            "km2_per_rank_hour": tps * 3600 * km2_per_tile,
        }
        print(
            f"  {m:<10} {tps:8.2f} tiles/s  {tps * mt * mt / 1e6:8.2f} MP/s  "
            f"{plan[m]['km2_per_rank_hour']:8.2f} km2/rank-hour at {a.pixel_size} m/px "
            f"({mt}px tiles, no overlap, batch {best})"
        )
    RESULTS["planning"] = plan
    RESULTS["machine"]["load_after"] = os.getloadavg()
    if a.out:
        a.out.write_text(json.dumps(RESULTS, indent=2))
        print(f"results: {a.out}")


if __name__ == "__main__":
    main()
