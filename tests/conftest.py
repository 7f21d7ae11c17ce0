"""Shared fixtures: real GeoTIFFs from the project's generator, no network, clean env."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import shapely
from hypothesis import settings

from mgpr.testimage import TestImageResult, TestImageSpec, write_test_image

# Property tests are deterministic: the same examples on every run and machine (CI included).
settings.register_profile("mgpr", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("mgpr")


#: Tests that run one after another on one pytest-xdist worker (``-n 2 --dist loadgroup`` in
#: pyproject.toml): those marked ``slurm`` share one two-node cluster; test_cluster.py compares
#: the busy times of two ranks; test_rendezvous.py shares one module fixture of two spawned gloo
#: ranks (~20 s), which each worker would otherwise start once.
SLURM_GROUP = "slurm"
SERIAL_FILES = {"test_cluster.py": "rank-timing", "test_rendezvous.py": "rendezvous"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``heavy`` tests (full-size networks compiled on the CPU) unless MGPR_HEAVY_TESTS=1;
    put the ``slurm`` tests and those of each file of :data:`SERIAL_FILES` in one xdist group
    each, and the groups first.

    Why first: each group runs one test after another on one worker (the SLURM group ~4 min,
    mostly waiting on the cluster), and xdist hands out work in collection order. Collected in
    file order, the SLURM group (test_slurm_*) started after ~7 of the suite's 10 minutes and ran
    on alone at the end; first, it overlaps the rest of the suite on the other worker.
    """
    for item in items:
        group = SLURM_GROUP if "slurm" in item.keywords else SERIAL_FILES.get(item.path.name)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)  # stable
    if os.environ.get("MGPR_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy: set MGPR_HEAVY_TESTS=1 to run it (minutes on a CPU)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_torch_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point torch.hub at an empty temp dir so no test reads a user's cache or downloads."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("MGPR_RUN_DIR", raising=False)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., TestImageResult]:
    """Factory: ``make_image(name="a.tif", width=..., height=..., **spec)`` in tmp_path."""

    def factory(name: str = "ortho.tif", **spec: object) -> TestImageResult:
        return write_test_image(tmp_path / name, TestImageSpec(**spec))  # type: ignore[arg-type]

    return factory


def run_mgpr_inprocess(*args: str) -> int:
    """Run ``mgpr`` in this process (1 rank); returns its exit code."""
    from mgpr.cli.main import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def segmentation_args(
    image: Path,
    run: Path,
    *more: str,
    model: str = "reference-seg",
    tile_size: int | None = 128,
    overlap: int | None = 32,
) -> list[str]:
    """Arguments of a small in-process segmentation run on 1 CPU rank.

    ``tile_size`` / ``overlap`` None leave them to ``more`` (or mgpr's defaults).
    """
    tiling = [f"tile_size={tile_size}"] if tile_size is not None else []
    tiling += [f"overlap={overlap}"] if overlap is not None else []
    return [
        f"input_path={image}",
        f"model={model}",
        "workers=0",
        "batch_size=4",
        "accelerator=cpu",
        "progress=false",
        *tiling,
        f"output_dir={run}",
        *more,
    ]


def write_utm_rgb(path: Path, data: Any, pixel_m: float = 0.1) -> Path:
    """A (3, H, W) uint8 array as a north-up GeoTIFF in UTM 33N, top-left at (500000, 5000000).

    For tests that plant their own pixels (the synthetic image generator draws its own scene).
    """
    import rasterio
    from rasterio.transform import from_origin

    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": str(data.dtype),
        "crs": "EPSG:32633",
        "transform": from_origin(500000.0, 5000000.0, pixel_m, pixel_m),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def write_paletted(path: Path, size: int = 32) -> Path:
    """A one-band paletted GeoTIFF (colour-table indexes 0..255 as a ramp), for refusal tests."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 6000000, 0.1, 0.1),
        photometric="palette",
    ) as dst:
        ramp = np.arange(size * size, dtype=np.int64).reshape(1, size, size) % 256
        dst.write(ramp.astype(np.uint8))
        dst.write_colormap(1, {i: (i, 255 - i, 0, 255) for i in range(256)})
    return path


def write_array(
    path: Path,
    data: Any,
    *,
    nodata: float | None = None,
    block: int | None = None,
    colorinterp: Any = None,
    compress: str | None = None,
) -> Path:
    """A GeoTIFF of ``data`` (bands, rows, cols) in its own dtype, 10 cm UTM 33N pixels.

    ``block``: square internal tiles of that size (None: GDAL's default strips);
    ``colorinterp``: one colour interpretation per band; ``compress``: a GDAL compression
    (``deflate``: a damaged block then fails to decode), None: uncompressed.
    """
    import rasterio
    from rasterio.transform import from_origin

    b, h, w = data.shape
    tiling = {} if block is None else {"tiled": True, "blockxsize": block, "blockysize": block}
    if compress is not None:
        tiling["compress"] = compress
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=b,
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(500_000, 5_000_000, 0.1, 0.1),
        nodata=nodata,
        **tiling,
    ) as dst:
        dst.write(data)
        if colorinterp is not None:
            dst.colorinterp = colorinterp
    return path


def mgpr_cmd(*args: str) -> list[str]:
    """Command line running mgpr in a fresh interpreter (needed for several ranks)."""
    return [sys.executable, "-m", "mgpr.cli.main", *args]


def web_mercator_y(lat: float) -> float:
    """Northing of ``lat`` degrees in EPSG:3857 (the spherical Mercator formula), metres."""
    import math

    return 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a run in a fresh interpreter: no SLURM_/MGPR_ variables (the test's
    run is no SLURM task and takes no test-only hook), warnings off, then ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MGPR_"))}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def run_mgpr_ranks(gpus: int, *args: str) -> None:
    """Run mgpr on ``gpus`` CPU ranks and assert it exits 0: in this process for one rank (one
    interpreter start-up, ~9 CPU-s, less), in a fresh interpreter for several (Lightning's
    launcher there starts the other ranks)."""
    args = (*args, f"gpus={gpus}", "accelerator=cpu")
    if gpus == 1:
        assert run_mgpr_inprocess(*args) == 0
        return
    cmd = mgpr_cmd(*args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_gpkg_layer(path: Path, layer: str) -> tuple[list[shapely.Geometry], list[dict], int]:
    """Read a GeoPackage with sqlite3 + shapely (not the writer's GDAL): geoms, rows, srs_id."""
    conn = sqlite3.connect(path)
    srs = conn.execute("SELECT srs_id FROM gpkg_contents WHERE table_name=?", (layer,)).fetchone()[
        0
    ]
    cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{layer}")')]
    geoms, rows = [], []
    for row in conn.execute(f'SELECT * FROM "{layer}"'):
        rec = dict(zip(cols, row, strict=True))
        blob = rec.pop("geom")
        flags = blob[3]
        envelope = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}[(flags >> 1) & 0b111]
        geoms.append(shapely.from_wkb(bytes(blob[8 + envelope :])))
        rows.append(rec)
    organisation = conn.execute(
        "SELECT organization_coordsys_id FROM gpkg_spatial_ref_sys WHERE srs_id=?", (srs,)
    ).fetchone()
    conn.close()
    return geoms, rows, organisation[0] if organisation else srs


def part_tile_rows(run: Path) -> list[tuple[str, str]]:
    """Every ``(tile_key, status)`` in the run's published part manifests, repeats included."""
    from mgpr.outputs.parts_read import read_manifests

    table = read_manifests(run)
    return list(zip(table["tile_key"].to_pylist(), table["status"].to_pylist(), strict=True))
