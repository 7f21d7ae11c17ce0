"""Synthetic georeferenced GeoTIFFs that look and compress like a real orthomosaic.

:func:`write_test_image` writes a uint8 GeoTIFF of ``height x width`` pixels and 1..4 bands, tiled
in ``block_size`` blocks, DEFLATE/ZSTD compressed with ``PREDICTOR=2``, BigTIFF when needed. It
streams block by block, so a 40000 x 40000 x 3 image needs little memory (the GDAL block cache is
capped at :data:`GDAL_CACHE_BYTES` during the write).

Content. Every pixel is a pure function of its *global* pixel coordinates ``(row, col)`` and
``seed`` (see :func:`render_block`), so blocks join seamlessly and the pixels do not depend on
``block_size``. The picture is made of fields (a rotated, domain-warped grid of cells about
``FIELD_PX`` pixels wide, each with its own crop colour and crop-row stripes), roads and dark
hedges along some cell boundaries, smooth low-frequency variation (bilinear value noise: random
values on coarse lattices, upsampled per block) and fine per-pixel hashed noise. Background
values lie in ``[BACKGROUND_MIN, BACKGROUND_MAX]`` = ``[8, 200]`` in every band, so a detector
thresholding "all bands >= 230" finds only planted objects.

Planted objects (``objects=N``) are bright rectangles, every band in ``[245, 255]``, of
``object_min_px..object_max_px`` pixels per side. A share ``seam_share`` of them straddles a tile
seam of the tile grid ``tile_size``/``overlap`` (tile ``k`` starts at ``k * stride`` with
``stride = tile_size - overlap``; an object straddles the seam at ``s = k * stride`` when
``row_min < s < row_max`` or ``col_min < s < col_max``); the others straddle none, so each lies
inside one tile. When any object is on a seam, object sides are clipped to ``overlap`` (with a
warning) so every object lies whole inside at least one tile: an object of side
``L <= overlap`` crossing ``k * stride`` lies inside ``[(k-1) * stride, k * stride + overlap)``,
tile ``k-1``. Objects keep a gap of at least :data:`OBJECT_GAP_PX` pixels from each other, from the
raster edge and from the nodata region. The ground truth is written beside the image as
``<stem>_truth.gpkg``, layer ``objects`` (see :func:`truth_path_for`, :func:`read_truth`).

Nodata. ``nodata="border"`` blanks a band of :func:`border_width_px` pixels around the raster,
``nodata="rect"`` blanks the rectangle ``rows [H/4, 3H/4) x cols [W/2, 9W/10)`` (large enough to
contain whole 256-pixel tiles of a 1024 image). Pixels in the region are 0 in every band. With
``nodata_mode="value"`` the file's nodata value is 0 (valid pixels are never 0); with
``nodata_mode="mask"`` the file carries a GDAL internal mask band (``GDAL_TIFF_INTERNAL_MASK``)
that is 0 in the region and 255 elsewhere, and no nodata value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from mgpr.errors import ConfigError, InputError, OutputError

__all__ = [
    "BACKGROUND_MAX",
    "BACKGROUND_MIN",
    "OBJECT_GAP_PX",
    "OBJECT_VALUE_MIN",
    "PlantedObject",
    "TestImageResult",
    "TestImageSpec",
    "border_width_px",
    "corrupt_block",
    "nodata_mask",
    "place_objects",
    "read_truth",
    "render_block",
    "seam_positions",
    "truth_path_for",
    "write_test_image",
]

log = logging.getLogger(__name__)

#: Lowest background value in any band (valid pixels are never 0, the nodata value).
BACKGROUND_MIN = 8
#: Highest background value in any band; planted objects are the only pixels above it.
BACKGROUND_MAX = 200
#: Lowest value of a planted object's pixel in any band (values are 245..255).
OBJECT_VALUE_MIN = 245
#: Minimum gap, in pixels, between an object and another object, the raster edge or nodata.
OBJECT_GAP_PX = 4
#: Approximate field (cell) width of the background pattern, pixels.
FIELD_PX = 420
#: GDAL block cache during the write, bytes; bounds memory for huge images.
GDAL_CACHE_BYTES = 64 * 1024 * 1024
#: Name of the truth layer in the GeoPackage.
TRUTH_LAYER = "objects"

_COMPRESS = ("deflate", "zstd", "lzw", "none")
_NODATA = ("none", "border", "rect")
_NODATA_MODES = ("value", "mask")
_MAX_SIDE_PX = 1 << 22  # 4 Mi pixels per side; far beyond any real orthomosaic tile set


def _fail(key: str, value: object, expected: str) -> ConfigError:
    """A one-line error naming the key, the bad value, what is expected and an example."""
    example = _DEFAULTS.get(key)
    fix = f"e.g. {key}={'none' if example is None else example} (the default)"
    return ConfigError(f"{key}={value!r} is invalid: expected {expected}; {fix}.")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class TestImageSpec:
    """What :func:`write_test_image` writes; validated on construction (:class:`ConfigError`).

    Attributes:
        width: raster width, pixels (>= 1).
        height: raster height, pixels (>= 1).
        bands: number of uint8 bands, 1..4 (3 = RGB, 4 = RGB + a NIR-like band).
        crs: any CRS rasterio understands (default UTM 33N, metres); ``None`` or ``"none"`` for a
            pixel-only raster with neither CRS nor geotransform.
        pixel_size: ground sampling distance, CRS units per pixel (metres for UTM), > 0.
        origin_x: map x of the raster's upper-left corner, CRS units.
        origin_y: map y of the raster's upper-left corner, CRS units (north-up raster).
        block_size: internal TIFF tile side, pixels; a multiple of 16 in 16..4096.
        compress: ``deflate`` (default), ``zstd``, ``lzw`` or ``none``; PREDICTOR=2 unless none.
        overviews: build internal overviews (factors 2, 4, ... down to <= 256 pixels).
        nodata: nodata region: ``none``, ``border`` or ``rect`` (see module docstring).
        nodata_mode: ``value`` (nodata value 0 in the file) or ``mask`` (internal mask band).
        objects: number of planted bright rectangles, >= 0.
        object_min_px: smallest object side, pixels (>= 2).
        object_max_px: largest object side, pixels; clipped to ``overlap`` (with a warning)
            when any object is on a seam.
        seam_share: share of objects that straddle a tile seam, 0..1 (rounded half up).
        tile_size: tile side of the inference tile grid the seams refer to, pixels.
        overlap: overlap between neighbouring tiles of that grid, pixels (< tile_size).
        seed: content and placement seed, >= 0; same seed, same pixels.
        num_threads: GDAL compression threads (``NUM_THREADS``); 0 = all CPUs. Output bytes do not
            depend on it.
    """

    __test__ = False  # not a pytest test class despite its name

    width: int = 2048
    height: int = 2048
    bands: int = 3
    crs: str | None = "EPSG:32633"
    pixel_size: float = 0.1
    origin_x: float = 500000.0
    origin_y: float = 5000000.0
    block_size: int = 512
    compress: str = "deflate"
    overviews: bool = False
    nodata: str = "none"
    nodata_mode: str = "value"
    objects: int = 0
    object_min_px: int = 12
    object_max_px: int = 40
    seam_share: float = 0.5
    tile_size: int = 256
    overlap: int = 64
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        for key in ("width", "height"):
            value = getattr(self, key)
            if not _is_int(value) or not 1 <= value <= _MAX_SIDE_PX:
                raise _fail(key, value, f"an integer number of pixels in 1..{_MAX_SIDE_PX}")
        if not _is_int(self.bands) or not 1 <= self.bands <= 4:
            raise _fail("bands", self.bands, "an integer in 1..4")
        if isinstance(self.crs, str) and self.crs.strip().lower() in ("none", "null", ""):
            object.__setattr__(self, "crs", None)
        if self.crs is not None:
            from pyproj import CRS  # quiet, unlike GDAL's parser which also prints to stderr
            from pyproj.exceptions import CRSError

            if not isinstance(self.crs, str):
                raise _fail("crs", self.crs, "a CRS string such as 'EPSG:32633', or none")
            try:
                CRS.from_user_input(self.crs)
            except CRSError:
                raise _fail("crs", self.crs, "a CRS such as 'EPSG:32633', or none") from None
        for key in ("pixel_size", "origin_x", "origin_y"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise _fail(key, value, "a finite number")
            if not math.isfinite(value) or (key == "pixel_size" and value <= 0):
                raise _fail(key, value, "a finite number" + (" > 0" if key == "pixel_size" else ""))
        if not _is_int(self.block_size) or not (
            16 <= self.block_size <= 4096 and self.block_size % 16 == 0
        ):
            raise _fail("block_size", self.block_size, "a multiple of 16 in 16..4096, e.g. 512")
        for key, choices in (
            ("compress", _COMPRESS),
            ("nodata", _NODATA),
            ("nodata_mode", _NODATA_MODES),
        ):
            value = getattr(self, key)
            if not isinstance(value, str) or value.lower() not in choices:
                raise _fail(key, value, "one of " + "|".join(choices))
            object.__setattr__(self, key, value.lower())
        if not isinstance(self.overviews, bool):
            raise _fail("overviews", self.overviews, "true or false")
        if not _is_int(self.objects) or self.objects < 0:
            raise _fail("objects", self.objects, "an integer >= 0")
        if not _is_int(self.object_min_px) or self.object_min_px < 2:
            raise _fail("object_min_px", self.object_min_px, "an integer number of pixels >= 2")
        if not _is_int(self.object_max_px) or self.object_max_px < self.object_min_px:
            raise _fail(
                "object_max_px",
                self.object_max_px,
                f"an integer >= object_min_px={self.object_min_px}",
            )
        if (
            isinstance(self.seam_share, bool)
            or not isinstance(self.seam_share, (int, float, np.number))
            or not 0.0 <= self.seam_share <= 1.0
        ):
            raise _fail("seam_share", self.seam_share, "a number in 0..1")
        if not _is_int(self.tile_size) or self.tile_size < 1:
            raise _fail("tile_size", self.tile_size, "an integer number of pixels >= 1")
        if not _is_int(self.overlap) or not 0 <= self.overlap < self.tile_size:
            raise _fail(
                "overlap", self.overlap, f"an integer in 0..tile_size-1={self.tile_size - 1}"
            )
        if self.seam_objects > 0 and self.overlap < self.object_min_px:
            raise ConfigError(
                f"overlap={self.overlap} is smaller than object_min_px={self.object_min_px}, so "
                "a seam object could lie whole inside no tile; set overlap >= object_min_px, "
                "lower object_min_px or set seam_share=0."
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise _fail("seed", self.seed, "an integer >= 0")
        if not _is_int(self.num_threads) or self.num_threads < 0:
            raise _fail("num_threads", self.num_threads, "an integer >= 0 (0 = all CPUs)")

    @property
    def stride(self) -> int:
        """Step between tile starts of the seam tile grid, pixels (``tile_size - overlap``)."""
        return self.tile_size - self.overlap

    @property
    def seam_objects(self) -> int:
        """Number of objects placed on a seam: ``floor(objects * seam_share + 0.5)``."""
        return int(math.floor(self.objects * self.seam_share + 0.5))

    @property
    def object_max_effective_px(self) -> int:
        """Largest object side used, pixels.

        ``min(object_max_px, overlap)`` when any object is on a seam, else ``object_max_px``.
        """
        if self.seam_objects > 0:
            return min(self.object_max_px, self.overlap)
        return self.object_max_px


@dataclass(frozen=True, slots=True)
class PlantedObject:
    """One planted bright rectangle, in raster pixels.

    The box is half-open in pixel-corner coordinates: rows ``row_min <= r < row_max``, columns
    ``col_min <= c < col_max``; its map footprint is the polygon through the corners
    ``transform * (col, row)`` of that box.

    Attributes:
        id: 0-based object number (its index in :attr:`TestImageResult.objects`).
        row_min: first row, pixels.
        col_min: first column, pixels.
        row_max: one past the last row, pixels.
        col_max: one past the last column, pixels.
        on_seam: whether the box straddles a seam of the tile grid (see module docstring).
    """

    id: int
    row_min: int
    col_min: int
    row_max: int
    col_max: int
    on_seam: bool

    @property
    def height(self) -> int:
        """Box height, pixels."""
        return self.row_max - self.row_min

    @property
    def width(self) -> int:
        """Box width, pixels."""
        return self.col_max - self.col_min


@dataclass(frozen=True, slots=True)
class TestImageResult:
    """What :func:`write_test_image` wrote.

    Attributes:
        path: the GeoTIFF.
        truth_path: the truth GeoPackage, or ``None`` when ``objects=0``.
        file_bytes: size of the GeoTIFF on disk (overviews and mask included), bytes.
        raw_bytes: uncompressed pixel bytes, ``width * height * bands``.
        objects: the planted objects, by id.
    """

    __test__ = False  # not a pytest test class despite its name

    path: Path
    truth_path: Path | None
    file_bytes: int
    raw_bytes: int
    objects: tuple[PlantedObject, ...]

    @property
    def compression_ratio(self) -> float:
        """``raw_bytes / file_bytes`` (> 1 means smaller than raw)."""
        return self.raw_bytes / self.file_bytes if self.file_bytes else float("inf")


_DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(TestImageSpec)}


# --------------------------------------------------------------------------------------------
# Geometry helpers: nodata region, seams, object placement (pure, no IO)
# --------------------------------------------------------------------------------------------


def border_width_px(spec: TestImageSpec) -> int:
    """Width of the nodata border for ``nodata="border"``, pixels: ``max(1, min(H, W) // 16)``."""
    return max(1, min(spec.height, spec.width) // 16)


def _nodata_rect(spec: TestImageSpec) -> tuple[int, int, int, int]:
    """Blank rectangle of ``nodata="rect"``: ``(row_min, col_min, row_max, col_max)``, half-open."""
    h, w = spec.height, spec.width
    return h // 4, w // 2, (3 * h) // 4, (9 * w) // 10


def nodata_mask(
    spec: TestImageSpec,
    row_off: int = 0,
    col_off: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> npt.NDArray[np.bool_]:
    """Return where the nodata region lies in a window of the raster.

    Args:
        spec: the image spec.
        row_off: first row of the window, pixels.
        col_off: first column of the window, pixels.
        height: window height, pixels; default the rest of the raster.
        width: window width, pixels; default the rest of the raster.

    Returns:
        (height, width) bool, True where the pixel is nodata (0 in every band).
    """
    h = spec.height - row_off if height is None else height
    w = spec.width - col_off if width is None else width
    rows = np.arange(row_off, row_off + h)
    cols = np.arange(col_off, col_off + w)
    if spec.nodata == "border":
        b = border_width_px(spec)
        r_out = (rows < b) | (rows >= spec.height - b)
        c_out = (cols < b) | (cols >= spec.width - b)
        return r_out[:, None] | c_out[None, :]
    if spec.nodata == "rect":
        r0, c0, r1, c1 = _nodata_rect(spec)
        return ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
    return np.zeros((h, w), dtype=bool)


def seam_positions(length: int, spec: TestImageSpec) -> npt.NDArray[np.int64]:
    """Seam positions along one axis where an object can straddle, pixels.

    Seams are ``k * stride`` for ``k >= 1``; only those strictly inside the band that keeps
    :data:`OBJECT_GAP_PX` from the raster edge count (a seam within the edge gap cannot carry an
    object).

    Args:
        length: raster height (rows) or width (columns), pixels.
        spec: the image spec (``tile_size``, ``overlap``, ``object_min_px``).

    Returns:
        (K,) int64, ascending.
    """
    seams = np.arange(spec.stride, length, spec.stride, dtype=np.int64)
    return seams[(seams > OBJECT_GAP_PX) & (seams < length - OBJECT_GAP_PX)]


def _straddles(lo: int, hi: int, seams: npt.NDArray[np.int64]) -> bool:
    """Whether the half-open span ``[lo, hi)`` has a seam strictly inside (``lo < s < hi``)."""
    i = int(np.searchsorted(seams, lo, side="right"))
    return i < len(seams) and int(seams[i]) < hi


def place_objects(spec: TestImageSpec) -> tuple[PlantedObject, ...]:
    """Choose the planted objects' boxes; deterministic from ``spec`` (and its ``seed``).

    ``round_half_up(objects * seam_share)`` objects straddle a seam (rows, columns or both), the
    others straddle none. Sides are uniform in ``object_min_px..object_max_effective_px``.
    Each box keeps :data:`OBJECT_GAP_PX` pixels from every other box, the raster edge and the
    nodata region (rejection sampling, 500 tries per object).

    Args:
        spec: the image spec.

    Returns:
        The objects, ids ``0..objects-1``.

    Raises:
        ConfigError: when the objects do not fit (too many, or too large for the raster).
    """
    n = spec.objects
    if n == 0:
        return ()
    if spec.object_max_effective_px < spec.object_max_px:
        log.warning(
            "object_max_px=%d is larger than overlap=%d; clipping object sides to %d pixels so "
            "every object lies whole inside a tile.",
            spec.object_max_px,
            spec.overlap,
            spec.overlap,
        )
    lo_px, hi_px = spec.object_min_px, spec.object_max_effective_px
    n_seam = spec.seam_objects
    seams_r = seam_positions(spec.height, spec)
    seams_c = seam_positions(spec.width, spec)
    gap = OBJECT_GAP_PX
    if n_seam and not (len(seams_r) or len(seams_c)):
        raise ConfigError(
            f"seam_share={spec.seam_share} asks for objects on tile seams but a "
            f"{spec.height}x{spec.width} raster has no seam for tile_size={spec.tile_size}, "
            f"overlap={spec.overlap}; set seam_share=0 or a smaller tile_size."
        )
    rng = np.random.default_rng([spec.seed, 0x0B1EC7])
    # Forbidden boxes expanded by the gap: nodata rect (border is handled by the margin).
    margin = gap + (border_width_px(spec) if spec.nodata == "border" else 0)
    boxes = np.empty((n + 1, 4), dtype=np.int64)  # row_min, col_min, row_max, col_max (+ gap)
    n_boxes = 0
    if spec.nodata == "rect":
        r0, c0, r1, c1 = _nodata_rect(spec)
        if r1 > r0 and c1 > c0:
            boxes[0] = (r0 - gap, c0 - gap, r1 + gap, c1 + gap)
            n_boxes = 1
    placed: list[PlantedObject] = []

    def span(length: int, side: int, seams: npt.NDArray[np.int64], on: bool) -> int | None:
        """Start of a span of ``side`` pixels inside ``[margin, length - margin)``."""
        lo, hi = margin, length - margin - side  # inclusive range of starts
        if hi < lo:
            return None
        if on:
            if not len(seams):
                return None
            s = int(seams[rng.integers(len(seams))])
            lo, hi = max(lo, s - side + 1), min(hi, s - 1)
            if hi < lo:
                return None
        return int(rng.integers(lo, hi + 1))

    for i in range(n):
        on_seam = i < n_seam
        for _ in range(500):
            oh, ow = (int(v) for v in rng.integers(lo_px, hi_px + 1, size=2))
            if on_seam:
                axes = ("r", "c", "rc")[int(rng.integers(3))]
                if not len(seams_r):
                    axes = "c"
                elif not len(seams_c):
                    axes = "r"
            else:
                axes = ""
            r = span(spec.height, oh, seams_r, "r" in axes)
            c = span(spec.width, ow, seams_c, "c" in axes)
            if r is None or c is None:
                continue
            on_r = _straddles(r, r + oh, seams_r)
            on_c = _straddles(c, c + ow, seams_c)
            if (on_r or on_c) != on_seam:
                continue
            b = boxes[:n_boxes]
            hit = (
                (b[:, 0] < r + oh + gap) & (b[:, 2] > r) & (b[:, 1] < c + ow + gap) & (b[:, 3] > c)
            )
            if n_boxes and bool(hit.any()):
                continue
            boxes[n_boxes] = (r, c, r + oh + gap, c + ow + gap)
            n_boxes += 1
            placed.append(PlantedObject(i, r, c, r + oh, c + ow, on_seam))
            break
        else:
            raise ConfigError(
                f"objects={n} do not fit a {spec.height}x{spec.width} raster (placed {i}; sides "
                f"{lo_px}..{hi_px} px, gap {gap} px, nodata={spec.nodata}); set fewer objects, "
                "smaller object_max_px or a larger width/height."
            )
    return tuple(placed)


# --------------------------------------------------------------------------------------------
# Content: pure function of global pixel coordinates and seed
# --------------------------------------------------------------------------------------------

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# Field palette (R, G, B, NIR-like), background values well below BACKGROUND_MAX.
_PALETTE = np.array(
    [
        [78, 112, 52, 150],  # young crop, green
        [96, 128, 60, 160],  # grass
        [150, 140, 92, 110],  # ripe cereal
        [168, 152, 104, 100],  # stubble
        [118, 94, 70, 70],  # bare soil
        [92, 74, 58, 60],  # wet soil
        [46, 72, 40, 130],  # forest
        [128, 120, 84, 90],  # dry meadow
    ],
    dtype=np.float32,
)
_ROAD = np.array([158, 156, 150, 120], dtype=np.float32)
_HEDGE = np.array([38, 52, 34, 90], dtype=np.float32)
#: Half width of a road and of a hedge, pixels.
_ROAD_HALF_PX = 6.0
_HEDGE_HALF_PX = 2.0
# Per-band weight of the shared texture (the 4th band varies a bit differently).
_BAND_GAIN = np.array([1.0, 1.0, 0.9, 1.2], dtype=np.float32)


def _mix64(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser, in place; uniform 64-bit output for any distinct input."""
    h ^= h >> _S30
    h *= _M2
    h ^= h >> _S27
    h *= _M3
    h ^= h >> _S31
    return h


def _hash2(i: npt.NDArray[np.int64], j: npt.NDArray[np.int64], key: int) -> npt.NDArray[np.uint64]:
    """Hash of integer lattice points (``i`` broadcast against ``j``) and a key, uint64.

    Used on small arrays only (lattices, per-field tables); per-pixel noise uses :func:`_hash_px`.
    """
    with np.errstate(over="ignore"):
        hi = _mix64(i.astype(np.uint64) * _M1 + np.uint64(key & 0xFFFFFFFFFFFFFFFF))
        h = hi ^ (j.astype(np.uint64) * _M3)
        return _mix64(h)


def _hash_px(row_off: int, col_off: int, h: int, w: int, key: int) -> npt.NDArray[np.uint32]:
    """Per-pixel 32-bit hash of global ``(row, col)`` and a key (lowbias32 finaliser), (h, w)."""
    rows = np.arange(row_off, row_off + h, dtype=np.uint64) * np.uint64(0x9E3779B1)
    cols = np.arange(col_off, col_off + w, dtype=np.uint64) * np.uint64(0x85EBCA77)
    mask = np.uint64(0xFFFFFFFF)
    r32 = ((rows + np.uint64(key & 0xFFFFFFFF)) & mask).astype(np.uint32)
    c32 = (_mix64(cols ^ np.uint64(key >> 32)) & mask).astype(np.uint32)
    x = r32[:, None] ^ c32[None, :]
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _unit(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.float32]:
    """Map uint64 hashes to float32 in [0, 1)."""
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _key(seed: int, channel: int) -> int:
    """A 64-bit key for one independent random channel of ``seed``."""
    return int(_mix64(np.array([seed * 1000003 + channel], dtype=np.uint64))[0])


def _lattice_1d(
    off: int, n: int, scale: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Lattice indices covering ``[off, off + n)`` and each pixel's cell and smooth weight."""
    pos = np.arange(off, off + n, dtype=np.int64)
    cell = pos // scale
    first = int(cell[0])
    lattice = np.arange(first, int(cell[-1]) + 2, dtype=np.int64)
    t = ((pos - cell * scale).astype(np.float32) + np.float32(0.5)) / np.float32(scale)
    t = t * t * (np.float32(3.0) - np.float32(2.0) * t)  # smoothstep: no visible lattice lines
    return lattice, (cell - first).astype(np.intp), t


def _value_noise(
    row_off: int, col_off: int, h: int, w: int, scale: int, key: int
) -> npt.NDArray[np.float32]:
    """Value noise in [0, 1): random lattice values every ``scale`` pixels, interpolated.

    Separable: the (nr, nc) lattice is interpolated along columns to (nr, w), then along rows to
    (h, w), so the cost is about three operations per pixel.
    """
    li, ci, ti = _lattice_1d(row_off, h, scale)
    lj, cj, tj = _lattice_1d(col_off, w, scale)
    grid = _unit(_hash2(li[:, None], lj[None, :], key))
    along_c = grid[:, cj] * (np.float32(1.0) - tj) + grid[:, cj + 1] * tj
    out: npt.NDArray[np.float32] = along_c[ci] * (np.float32(1.0) - ti)[:, None]
    out += along_c[ci + 1] * ti[:, None]
    return out


def _boundary(
    f: npt.NDArray[np.float32], cell_px: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Cell index of each pixel along one field axis and its distance to the nearest boundary.

    Args:
        f: (h, w) coordinate in cell units; overwritten with its fraction in [0, 1).
        cell_px: cell width, pixels.

    Returns:
        (cell index, distance to the nearest cell boundary in pixels, the fraction ``f``; the
        nearest boundary is the cell's upper one, ``idx + 1``, where the fraction is > 0.5).
    """
    idx = np.floor(f)
    f -= idx
    dist = np.float32(1.0) - f
    np.minimum(f, dist, out=dist)
    dist *= np.float32(cell_px)
    return idx.astype(np.intp), dist, f


def render_block(
    spec: TestImageSpec,
    row_off: int,
    col_off: int,
    height: int,
    width: int,
    objects: tuple[PlantedObject, ...] = (),
) -> npt.NDArray[np.uint8]:
    """Render one window of the image; a pure function of global pixel coordinates and seed.

    The background is built from: rotated, domain-warped field cells (``FIELD_PX`` pixels wide;
    per-cell colour, brightness and crop-row stripes looked up in small per-block tables),
    roads and hedges along cell boundary lines (each whole line is a road with probability 1/4,
    otherwise a hedge), two octaves of smooth value noise and per-pixel hashed noise.

    Args:
        spec: the image spec (``bands``, ``seed``, ``nodata``, raster size).
        row_off: first row of the window, pixels.
        col_off: first column of the window, pixels.
        height: window height, pixels.
        width: window width, pixels.
        objects: planted objects to paint (those not touching the window are skipped).

    Returns:
        (bands, height, width) uint8: background in [8, 200], objects in [245, 255], nodata 0.
    """
    seed = spec.seed
    h, w = height, width
    f32 = np.float32
    rows = np.arange(row_off, row_off + h, dtype=f32)
    cols = np.arange(col_off, col_off + w, dtype=f32)
    # Rotated, domain-warped coordinates, in field-cell units along u and v.
    angle = 0.15 + 0.5 * (_key(seed, 1) % 1000) / 1000.0
    cell_u, cell_v = float(FIELD_PX), FIELD_PX * 1.37
    ca, sa = math.cos(angle), math.sin(angle)
    amp = 140.0
    fu = _value_noise(row_off, col_off, h, w, 512, _key(seed, 2))
    fu *= f32(amp / cell_u)
    fu += (rows * f32(ca / cell_u))[:, None] + (cols * f32(sa / cell_u))[None, :]
    fv = _value_noise(row_off, col_off, h, w, 512, _key(seed, 3))
    fv *= f32(amp / cell_v)
    fv += (cols * f32(ca / cell_v))[None, :] - (rows * f32(sa / cell_v))[:, None]
    # Stripe phase (crop rows) before fu/fv are reduced to boundary distances.
    phase_u = fu * f32(cell_u)
    phase_v = fv * f32(cell_v)
    iu, du, fu = _boundary(fu, cell_u)
    iv, dv, fv = _boundary(fv, cell_v)
    # Per-cell tables over the few cells in this block; index k = (iu - u0) * nv + (iv - v0).
    u0, v0 = int(iu.min()), int(iv.min())
    nu, nv = int(iu.max()) - u0 + 1, int(iv.max()) - v0 + 1
    cu = np.arange(u0, u0 + nu, dtype=np.int64)
    cv = np.arange(v0, v0 + nv, dtype=np.int64)
    cell_hash = _hash2(cu[:, None], cv[None, :], _key(seed, 4)).ravel()
    n_cells = nu * nv
    road_id, hedge_id = n_cells, n_cells + 1
    colour = (cell_hash % np.uint64(len(_PALETTE))).astype(np.intp)
    tone = ((cell_hash >> np.uint64(24)) % np.uint64(41)).astype(f32) - f32(20.0)
    base = np.empty((n_cells + 2, 4), dtype=f32)  # per-cell band values, + road, + hedge
    base[:n_cells] = _PALETTE[colour] + tone[:, None]
    base[road_id], base[hedge_id] = _ROAD, _HEDGE
    stripe_amp = np.zeros(n_cells + 2, dtype=f32)
    stripe_amp[:n_cells] = 7.0
    stripe_along_u = ((cell_hash >> np.uint64(8)) & np.uint64(1)).astype(bool)
    period = 5.0 + ((cell_hash >> np.uint64(16)) % np.uint64(7)).astype(f32)
    stripe_freq = np.zeros(n_cells + 2, dtype=f32)
    stripe_freq[:n_cells] = f32(2 * math.pi) / period
    # Roads and hedges along boundary lines; a whole line is a road with probability 1/4. Only
    # the few pixels within _ROAD_HALF_PX of a line are looked at (flat indices).
    lu = np.arange(u0, u0 + nu + 1, dtype=np.int64)
    lv = np.arange(v0, v0 + nv + 1, dtype=np.int64)
    road_u_tab = (_hash2(lu, np.zeros(1, np.int64), _key(seed, 8)) % np.uint64(4)) == 0
    road_v_tab = (_hash2(lv, np.zeros(1, np.int64), _key(seed, 9)) % np.uint64(4)) == 0
    marks = []  # (flat pixel indices, is road) per axis
    for i_cell, dist, frac, first, tab in (
        (iu, du, fu, u0, road_u_tab),
        (iv, dv, fv, v0, road_v_tab),
    ):
        near = np.flatnonzero(dist < f32(_ROAD_HALF_PX))
        line = i_cell.ravel()[near] - first + (frac.ravel()[near] > f32(0.5))
        is_road = tab[line]
        is_hedge = dist.ravel()[near] < f32(_HEDGE_HALF_PX)
        marks.append((near[is_hedge & ~is_road], near[is_road]))
    k = iu  # flat cell index, in place: (iu - u0) * nv + (iv - v0)
    k -= u0
    k *= nv
    k += iv
    k -= v0
    k_flat = k.ravel()
    for hedge_px, _ in marks:
        k_flat[hedge_px] = hedge_id
    for _, road_px in marks:  # roads win over hedges
        k_flat[road_px] = road_id
    # Crop-row stripes: along u or v depending on the cell.
    along_u_px = np.take(np.append(stripe_along_u, [False, False]), k)
    stripes = np.where(along_u_px, phase_u, phase_v)
    stripes *= np.take(stripe_freq, k)
    np.sin(stripes, out=stripes)
    stripes *= np.take(stripe_amp, k)
    # Smooth variation: two octaves of value noise, about [-21, 21].
    texture = _value_noise(row_off, col_off, h, w, 96, _key(seed, 5))
    texture += _value_noise(row_off, col_off, h, w, 24, _key(seed, 6)) * f32(0.5)
    texture -= f32(0.75)
    texture *= f32(28.0)
    texture += stripes
    # Fine texture: per-pixel hashed noise, triangular in [-8, 8] from hash bytes 0 and 1, and
    # an independent 0..7 per band (sensor noise) from the nibbles of bytes 2 and 3.
    px = _hash_px(row_off, col_off, h, w, _key(seed, 7))
    # Bytes in little-endian order on every platform (a no-op view on little-endian machines).
    px_bytes = px.astype("<u4", copy=False).view(np.uint8).reshape(h, w, 4)
    noise = px_bytes[..., 0].astype(f32)
    noise += px_bytes[..., 1]
    noise *= f32(16.0 / 510.0)
    noise -= f32(8.0)
    texture += noise
    out = np.empty((spec.bands, h, w), dtype=np.uint8)
    band = np.empty((h, w), dtype=f32)
    top = f32(BACKGROUND_MAX - 7)
    for b in range(spec.bands):
        np.take(base[:, b], k, out=band)
        if _BAND_GAIN[b] == 1.0:
            band += texture
        else:
            band += texture * _BAND_GAIN[b]
        np.minimum(band, top, out=band)
        np.maximum(band, f32(BACKGROUND_MIN), out=band)
        out[b] = band
        sensor = px_bytes[..., 2 + b // 2] >> np.uint8(4 * (b % 2))
        sensor &= np.uint8(7)
        out[b] += sensor
    _paint_objects(out, row_off, col_off, objects, px)
    if spec.nodata != "none":
        out[:, nodata_mask(spec, row_off, col_off, h, w)] = 0
    return out


def _paint_objects(
    out: npt.NDArray[np.uint8],
    row_off: int,
    col_off: int,
    objects: tuple[PlantedObject, ...],
    px_hash: npt.NDArray[np.uint32],
) -> None:
    """Paint the objects touching the window: every band ``245 + hash % 11`` (245..255)."""
    _, h, w = out.shape
    for obj in objects:
        r0, r1 = max(obj.row_min - row_off, 0), min(obj.row_max - row_off, h)
        c0, c1 = max(obj.col_min - col_off, 0), min(obj.col_max - col_off, w)
        if r0 >= r1 or c0 >= c1:
            continue
        hh = px_hash[r0:r1, c0:c1]
        for b in range(out.shape[0]):
            vals = (hh >> np.uint32(7 * b + 3)) % np.uint32(11)
            out[b, r0:r1, c0:c1] = vals.astype(np.uint8) + np.uint8(OBJECT_VALUE_MIN)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def truth_path_for(path: str | Path) -> Path:
    """Truth GeoPackage path for an image: ``<dir>/<image stem>_truth.gpkg``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_truth.gpkg")


def _transform(spec: TestImageSpec) -> Affine:
    """Pixel-corner -> map transform: north-up, upper-left corner at the origin; identity if no CRS.

    Same as ``rasterio.transform.from_origin(origin_x, origin_y, pixel_size, pixel_size)``.
    """
    if spec.crs is None:
        return Affine.identity()
    return Affine.translation(spec.origin_x, spec.origin_y) @ Affine.scale(
        spec.pixel_size, -spec.pixel_size
    )


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


def _write_tiff(tmp: Path, spec: TestImageSpec, objects: tuple[PlantedObject, ...]) -> None:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": spec.width,
        "height": spec.height,
        "count": spec.bands,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": spec.block_size,
        "blockysize": spec.block_size,
        "interleave": "pixel",
        "bigtiff": "IF_SAFER",
        "num_threads": "ALL_CPUS" if spec.num_threads == 0 else str(spec.num_threads),
    }
    if spec.compress != "none":
        profile.update(compress=spec.compress.upper(), predictor=2)
    if spec.bands >= 3:
        profile["photometric"] = "RGB"
    if spec.crs is not None:
        profile["crs"] = spec.crs
        profile["transform"] = _transform(spec)
    use_mask = spec.nodata != "none" and spec.nodata_mode == "mask"
    if spec.nodata != "none" and spec.nodata_mode == "value":
        profile["nodata"] = 0
    env = {"GDAL_CACHEMAX": GDAL_CACHE_BYTES // (1024 * 1024), "GDAL_TIFF_INTERNAL_MASK": True}
    with rasterio.Env(**env), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # crs=none is deliberate
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.update_tags(MGPR_TESTIMAGE=json.dumps(dataclasses.asdict(spec), sort_keys=True))
            for r, c, h, w in _blocks(spec):
                window = Window(c, r, w, h)  # rasterio: columns first
                block = render_block(spec, r, c, h, w, objects)
                dst.write(block, window=window)
                if use_mask:
                    valid = ~nodata_mask(spec, r, c, h, w)
                    dst.write_mask(valid.astype(np.uint8) * np.uint8(255), window=window)
        if spec.overviews:
            factors = _overview_factors(spec)
            if factors:
                ov_env: dict[str, Any] = {"COMPRESS_OVERVIEW": spec.compress.upper()}
                if spec.compress != "none":
                    ov_env["PREDICTOR_OVERVIEW"] = 2
                with rasterio.Env(**ov_env), rasterio.open(tmp, "r+") as dst:
                    dst.build_overviews(factors, Resampling.average)
                    dst.update_tags(ns="rio_overview", resampling="average")


def _write_truth(tmp: Path, spec: TestImageSpec, objects: tuple[PlantedObject, ...]) -> None:
    import shapely
    from pyogrio.raw import write as ogr_write

    transform = _transform(spec)
    polys = []
    for o in objects:
        x0, y0 = transform @ (o.col_min, o.row_min)  # pixel corners -> map
        x1, y1 = transform @ (o.col_max, o.row_max)
        polys.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    geometry = shapely.to_wkb(np.array(polys, dtype=object))
    fields = ["id", "row_min", "col_min", "row_max", "col_max", "on_seam"]
    data = [np.array([getattr(o, f) for o in objects], dtype=np.int64) for f in fields[:-1]]
    data.append(np.array([o.on_seam for o in objects], dtype=bool))
    with warnings.catch_warnings():
        # crs=None is deliberate (pixel-only image); pyogrio warns about it.
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        ogr_write(
            str(tmp),
            geometry,
            data,
            fields,
            layer=TRUTH_LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            crs=spec.crs,
        )


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
    t0 = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temp_beside(path, ".tif") as tmp_img, _temp_beside(path, ".gpkg") as tmp_truth:
            _write_tiff(tmp_img, spec, objects)
            if objects:
                _write_truth(tmp_truth, spec, objects)
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
    raw_bytes = spec.width * spec.height * spec.bands
    result = TestImageResult(
        path=path,
        truth_path=truth_path if objects else None,
        file_bytes=file_bytes,
        raw_bytes=raw_bytes,
        objects=objects,
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


def read_truth(truth_path: str | Path) -> list[PlantedObject]:
    """Read the planted objects back from a truth GeoPackage (layer ``objects``).

    Args:
        truth_path: the ``<stem>_truth.gpkg`` written by :func:`write_test_image`.

    Returns:
        The objects sorted by id (pixel boxes from the attribute fields).

    Raises:
        InputError: when the file is missing or has no ``objects`` layer.
    """
    from pyogrio.errors import DataLayerError, DataSourceError
    from pyogrio.raw import read as ogr_read

    p = Path(truth_path)
    if not p.is_file():
        raise InputError(
            f"truth file {str(p)!r} does not exist; write it with mgpr-test-image objects=N."
        )
    try:
        meta, _, _, field_data = ogr_read(str(p), layer=TRUTH_LAYER, read_geometry=False)
    except (DataLayerError, DataSourceError) as exc:
        raise InputError(
            f"truth file {str(p)!r} has no readable layer {TRUTH_LAYER!r} ({exc}); "
            "rewrite it with mgpr-test-image objects=N."
        ) from exc
    cols = dict(zip(list(meta["fields"]), field_data, strict=True))
    objs = [
        PlantedObject(
            id=int(cols["id"][i]),
            row_min=int(cols["row_min"][i]),
            col_min=int(cols["col_min"][i]),
            row_max=int(cols["row_max"][i]),
            col_max=int(cols["col_max"][i]),
            on_seam=bool(cols["on_seam"][i]),
        )
        for i in range(len(field_data[0]) if field_data else 0)
    ]
    return sorted(objs, key=lambda o: o.id)


def corrupt_block(path: str | Path, block_row: int, block_col: int) -> int:
    """Overwrite the compressed bytes of one internal block with garbage, in place.

    Simulates a damaged file (bad sector, truncated copy): the header stays valid, so the
    raster opens, but decoding that block fails while every other block reads. The block's
    byte range comes from GDAL's ``BLOCK_OFFSET_<col>_<row>`` / ``BLOCK_SIZE_<col>_<row>``
    items of the ``TIFF`` metadata domain; every band's block is damaged (one block for all
    bands with pixel interleaving).

    Args:
        path: a tiled GeoTIFF (e.g. from :func:`write_test_image` with compression).
        block_row: block index along rows (0-based; block ``r`` covers rows
            ``r * block_height ..``).
        block_col: block index along columns (0-based).

    Returns:
        Bytes overwritten.

    Raises:
        ConfigError: the block does not exist in the file.
    """
    import rasterio

    ranges: set[tuple[int, int]] = set()
    with rasterio.open(path) as src:
        for bidx in src.indexes:
            offset = src.get_tag_item(f"BLOCK_OFFSET_{block_col}_{block_row}", "TIFF", bidx=bidx)
            size = src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=bidx)
            if offset is None or size is None or int(size) == 0:
                raise ConfigError(
                    f"block_row={block_row}, block_col={block_col} is not a block of {str(path)!r} "
                    f"(blocks of {src.block_shapes[0]} pixels); pick indexes inside the raster."
                )
            ranges.add((int(offset), int(size)))
    written = 0
    with open(path, "r+b") as fh:
        for offset, size in sorted(ranges):
            fh.seek(offset)
            fh.write(bytes([0xFF, 0x00] * (size // 2) + [0xFF] * (size % 2)))
            written += size
    return written
