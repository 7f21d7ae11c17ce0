"""Write a test image: a tiled, compressed GeoTIFF streamed block by block, plus its truth.

:func:`write_test_image` writes a GeoTIFF of ``height x width`` pixels, 1..4 bands and
``spec.dtype`` (uint8 by default; uint16/int16/float32 hold the 8-bit picture stretched to
``value_range``, :func:`~mgpr.testimage.render.stretch_block`), tiled
in ``block_size`` blocks, DEFLATE/ZSTD compressed with ``PREDICTOR=2``, BigTIFF when needed. It
streams block by block, so a 40000 x 40000 x 3 image needs little memory (the GDAL block cache is
capped at :data:`GDAL_CACHE_BYTES` during the write). With ``nodata_mode="value"`` the file's
nodata value is ``spec.effective_nodata_value`` (0 for uint8/uint16, -32768 for int16, NaN for
float32, or ``nodata_value``; never a valid pixel's value); with ``nodata_mode="mask"`` the file
carries a GDAL internal mask band (``GDAL_TIFF_INTERNAL_MASK``) that is 0 in the nodata region
and 255 elsewhere, and no nodata value; with ``nodata_mode="alpha"`` an alpha band (the last,
colour interpretation alpha) holds those 0 / 255 instead. Hidden objects (``hidden_objects``)
are painted inside the nodata region under the mask or alpha.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mgpr.errors import ConfigError, OutputError
from mgpr.testimage.layout import nodata_mask, place_hidden_objects, place_objects
from mgpr.testimage.render import render_block, stretch_block
from mgpr.testimage.spec import PlantedObject, TestImageResult, TestImageSpec, map_transform
from mgpr.testimage.truth import truth_path_for, write_truth

log = logging.getLogger(__name__)

#: GDAL block cache during the write, bytes; bounds memory for huge images.
GDAL_CACHE_BYTES = 64 * 1024 * 1024


def _overview_factors(spec: TestImageSpec) -> list[int]:
    factors = []
    f = 2
    while max(spec.height, spec.width) / (f // 2) > 256:
        factors.append(f)
        f *= 2
    return factors


@contextlib.contextmanager
def _temp_beside(path: Path, suffix: str) -> Iterator[Path]:
    """A fresh temp name in ``path``'s directory (hidden, ending in ``.tmp<suffix>``).

    The file is created by whoever writes it (so it gets the umask's usual mode, unlike
    ``mkstemp``'s 0600) and removed here if it is still there on exit: the caller
    ``os.replace``s it onto the final name on success.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _blocks(spec: TestImageSpec) -> Iterator[tuple[int, int, int, int]]:
    bs = spec.block_size
    for r in range(0, spec.height, bs):
        for c in range(0, spec.width, bs):
            yield r, c, min(bs, spec.height - r), min(bs, spec.width - c)


def _write_tiff(
    tmp: Path,
    spec: TestImageSpec,
    objects: tuple[PlantedObject, ...],
    hidden: tuple[PlantedObject, ...] = (),
) -> None:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": spec.width,
        "height": spec.height,
        "count": spec.bands + (spec.nodata_mode == "alpha"),
        "dtype": spec.dtype,
        "tiled": True,
        "blockxsize": spec.block_size,
        "blockysize": spec.block_size,
        "interleave": "pixel",
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS" if spec.num_threads == 0 else str(spec.num_threads),
    }
    if spec.compress != "none":
        # Horizontal differencing (2) for integers, floating-point prediction (3) for floats.
        profile.update(
            compress=spec.compress.upper(), predictor=3 if spec.dtype == "float32" else 2
        )
    if spec.bands >= 3:
        profile["photometric"] = "RGB"
    alpha = spec.nodata_mode == "alpha"
    if alpha:
        profile["alpha"] = "YES"  # the first extra sample (the band after the image's) is alpha
    if spec.crs is not None:
        profile["crs"] = spec.crs
        profile["transform"] = map_transform(spec)
    use_mask = spec.nodata != "none" and spec.nodata_mode == "mask"
    value_nodata = spec.nodata != "none" and spec.nodata_mode == "value"
    if value_nodata:
        profile["nodata"] = spec.effective_nodata_value
    env = {"GDAL_CACHEMAX": GDAL_CACHE_BYTES // (1024 * 1024), "GDAL_TIFF_INTERNAL_MASK": True}
    with rasterio.Env(**env), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # crs=none is deliberate
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(MGPR_TESTIMAGE=json.dumps(dataclasses.asdict(spec), sort_keys=True))
            image_bands = list(range(1, spec.bands + 1))
            for r, c, h, w in _blocks(spec):
                window = Window(c, r, w, h)  # rasterio: columns first
                block = render_block(spec, r, c, h, w, objects, hidden)
                nodata_px = nodata_mask(spec, r, c, h, w) if value_nodata else None
                dst.write(stretch_block(block, spec, nodata_px), indexes=image_bands, window=window)
                if alpha:
                    valid = ~nodata_mask(spec, r, c, h, w)
                    dst.write(valid.astype(spec.dtype) * 255, indexes=spec.bands + 1, window=window)
                if use_mask:
                    valid = ~nodata_mask(spec, r, c, h, w)
                    dst.write_mask(valid.astype(np.uint8) * np.uint8(255), window=window)
        if spec.overviews:
            factors = _overview_factors(spec)
            if factors:
                ov_env: dict[str, Any] = {"COMPRESS_OVERVIEW": spec.compress.upper()}
                if spec.compress != "none":
                    ov_env["PREDICTOR_OVERVIEW"] = 3 if spec.dtype == "float32" else 2
                with rasterio.Env(**ov_env), rasterio.open(tmp, "r+") as dst:
                    dst.build_overviews(factors, Resampling.average)
                    dst.update_tags(ns="rio_overview", resampling="average")


def write_test_image(path: str | Path, spec: TestImageSpec) -> TestImageResult:
    """Write a synthetic GeoTIFF (and its truth GeoPackage when ``spec.objects > 0``).

    Both files are written to temp names in the target directory and then ``os.replace``d, so a
    reader never sees a half-written file; an existing file is overwritten. A stale
    ``<stem>_truth.gpkg`` from an earlier run with objects is removed when ``objects=0``.

    Args:
        path: output GeoTIFF; parent directories are created.
        spec: what to write (validated on construction).

    Returns:
        Paths, sizes (bytes) and the planted objects.

    Raises:
        ConfigError: when the objects do not fit the raster.
        OutputError: when the files cannot be written.
    """
    from pyogrio.errors import DataLayerError, DataSourceError
    from rasterio.errors import RasterioError

    if not isinstance(spec, TestImageSpec):
        raise ConfigError(f"spec={spec!r} is not a TestImageSpec; build one with TestImageSpec().")
    path = Path(path)
    truth_path = truth_path_for(path)
    objects = place_objects(spec)
    hidden = place_hidden_objects(spec)
    t0 = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temp_beside(path, ".tif") as tmp_img, _temp_beside(path, ".gpkg") as tmp_truth:
            _write_tiff(tmp_img, spec, objects, hidden)
            if objects:
                write_truth(tmp_truth, spec, objects)
            os.replace(tmp_img, path)
            if objects:
                os.replace(tmp_truth, truth_path)
            elif truth_path.exists():
                log.info("Removing stale truth file %s (objects=0).", truth_path)
                truth_path.unlink()
    except (OSError, RasterioError, DataSourceError, DataLayerError) as exc:
        detail = " ".join(str(exc).split())  # GDAL messages can span lines
        raise OutputError(
            f"cannot write test image to {str(path)!r} ({detail}); choose a writable image_path."
        ) from exc
    file_bytes = path.stat().st_size
    count = spec.bands + (spec.nodata_mode == "alpha")
    raw_bytes = spec.width * spec.height * count * np.dtype(spec.dtype).itemsize
    result = TestImageResult(
        path=path,
        truth_path=truth_path if objects else None,
        file_bytes=file_bytes,
        raw_bytes=raw_bytes,
        objects=objects,
        hidden=hidden,
    )
    log.info(
        "Wrote %s (%dx%dx%d, %.1f MB, ratio %.2f) in %.1f s.",
        path,
        spec.width,
        spec.height,
        spec.bands,
        file_bytes / 1e6,
        result.compression_ratio,
        time.perf_counter() - t0,
    )
    return result
