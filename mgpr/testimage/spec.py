"""What a synthetic test image is: its validated spec, its planted objects, the write result.

:class:`TestImageSpec` is checked on construction, so a bad key fails with one line naming the
key, the bad value and a valid example (:class:`~mgpr.errors.ConfigError`) before any pixel is
rendered. The spec's pixel-corner -> map transform is :func:`map_transform`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine

from mgpr.errors import ConfigError

_COMPRESS = ("deflate", "zstd", "lzw", "none")
_NODATA = ("none", "border", "rect")
_NODATA_MODES = ("value", "mask", "alpha")
_DTYPES = ("uint8", "uint16", "int16", "float32")
#: The value range the generator's 0..255 content is stretched to, per dtype, when unset.
DEFAULT_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "uint8": (0.0, 255.0),
    "uint16": (0.0, 10000.0),
    "int16": (-1000.0, 10000.0),
    "float32": (0.0, 1.0),
}
#: The file's nodata value per dtype (``nodata_mode="value"``); never a valid pixel's value.
NODATA_VALUES: dict[str, float] = {
    "uint8": 0.0,
    "uint16": 0.0,
    "int16": -32768.0,
    "float32": float("nan"),
}
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
        bands: number of bands, 1..4 (3 = RGB, 4 = RGB + a NIR-like band).
        dtype: ``uint8`` (default), ``uint16``, ``int16`` or ``float32``. The 8-bit picture is
            stretched linearly to ``value_range`` (``lo + v / 255 * (hi - lo)``, rounded for
            integers), so ``mgpr value_range=[lo,hi]`` maps it back to the same [0, 1] input
            and the planted objects (and the truth) are the same for every dtype.
        value_range: ``(lo, hi)`` the content is stretched to; None = the dtype's default
            (:data:`DEFAULT_VALUE_RANGES`: uint8 [0, 255], uint16 [0, 10000], int16
            [-1000, 10000], float32 [0, 1]).
        crs: any CRS rasterio understands (default UTM 33N, metres); ``None`` or ``"none"`` for a
            pixel-only raster with neither CRS nor geotransform.
        pixel_size: ground sampling distance, CRS units per pixel (metres for UTM), > 0.
        origin_x: map x of the raster's upper-left corner, CRS units.
        origin_y: map y of the raster's upper-left corner, CRS units (north-up raster).
        block_size: internal TIFF tile side, pixels; a multiple of 16 in 16..4096.
        compress: ``deflate`` (default), ``zstd``, ``lzw`` or ``none``; PREDICTOR=2 unless none.
        overviews: build internal overviews (factors 2, 4, ... down to <= 256 pixels).
        nodata: nodata region: ``none``, ``border`` or ``rect`` (see module docstring).
        nodata_mode: ``value`` (the file's nodata value: 0 for uint8/uint16, -32768 for int16,
            NaN for float32, :data:`NODATA_VALUES`, or ``nodata_value``), ``mask`` (internal
            mask band) or ``alpha`` (one more band, colour interpretation alpha, after the
            ``bands`` image bands: 0 in the nodata region, 255 elsewhere; ``bands`` 1 or 3:
            grey + alpha or RGBA, the layouts GDAL takes as the dataset mask).
        nodata_value: the file's nodata value under ``nodata_mode="value"``, overriding the
            dtype's (e.g. 255 for a uint8 raster whose nodata region is white); valid pixels
            that would equal it are moved one level towards the middle of the dtype's range,
            so no valid pixel is nodata. None = :data:`NODATA_VALUES`.
        hidden_objects: bright rectangles planted wholly inside the nodata region (with
            ``nodata_mode=mask|alpha``, whose pixels under the mask are still read), never in
            the truth: a run that honours the validity mask reports none of them
            (:attr:`TestImageResult.hidden`).
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
    dtype: str = "uint8"
    value_range: tuple[float, float] | None = None
    crs: str | None = "EPSG:32633"
    pixel_size: float = 0.1
    origin_x: float = 500000.0
    origin_y: float = 5000000.0
    block_size: int = 512
    compress: str = "deflate"
    overviews: bool = False
    nodata: str = "none"
    nodata_mode: str = "value"
    nodata_value: float | None = None
    objects: int = 0
    hidden_objects: int = 0
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
        self._check_dtype()
        if isinstance(self.crs, str) and self.crs.strip().lower() in ("none", "null", ""):
            object.__setattr__(self, "crs", None)
        if self.crs is not None:
            from pyproj import CRS  # quiet, unlike GDAL's parser which also prints to stderr
            from pyproj.exceptions import CRSError

            bare = isinstance(self.crs, int) and not isinstance(self.crs, bool)
            if bare or (isinstance(self.crs, str) and self.crs.strip().isdigit()):
                # crs=32633: pyproj reads a bare EPSG number, the writer's GDAL did not (a
                # traceback): it is that EPSG code
                object.__setattr__(self, "crs", f"EPSG:{str(self.crs).strip()}")
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
        self._check_nodata()
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
        self._check_geographic_extent()

    def _check_geographic_extent(self) -> None:
        """A degree-based CRS needs an origin and pixel size in degrees, inside the globe.

        The defaults are metres (UTM): ``crs=EPSG:4326`` alone would put the raster at longitude
        500,000 and write georeferencing no GIS can place.
        """
        if self.crs is None:
            return
        from pyproj import CRS

        crs = CRS.from_user_input(self.crs)
        if not crs.is_geographic:
            return
        west, north = float(self.origin_x), float(self.origin_y)
        east = west + self.width * float(self.pixel_size)
        south = north - self.height * float(self.pixel_size)
        if -180.0 <= west and east <= 180.0 and -90.0 <= south and north <= 90.0:
            return
        raise ConfigError(
            f"crs={self.crs} is in degrees, but origin_x={self.origin_x:g}, "
            f"origin_y={self.origin_y:g} and pixel_size={self.pixel_size:g} put the raster at "
            f"longitudes {west:g}..{east:g}, latitudes {south:g}..{north:g}; give them in degrees, "
            "e.g. origin_x=10 origin_y=50 pixel_size=0.000001 (about 0.1 m)."
        )

    def _check_dtype(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype.lower() not in _DTYPES:
            raise _fail("dtype", self.dtype, "one of " + "|".join(_DTYPES))
        object.__setattr__(self, "dtype", self.dtype.lower())
        if self.value_range is None:
            return
        vr = self.value_range
        if (
            not isinstance(vr, (tuple, list))
            or len(vr) != 2
            or not all(
                isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vr
            )
            or not all(math.isfinite(v) for v in vr)
            or not vr[0] < vr[1]
        ):
            raise _fail("value_range", vr, "[lo,hi] with finite numbers lo < hi, e.g. [0,10000]")
        lo, hi = float(vr[0]), float(vr[1])
        if self.dtype != "float32":
            info = np.iinfo(self.dtype)
            floor = info.min + 1 if self.dtype == "int16" else info.min  # -32768 is nodata
            if lo < floor or hi > info.max or hi - lo < 255:
                raise _fail(
                    "value_range",
                    vr,
                    f"[lo,hi] within {floor}..{info.max} for {self.dtype}, at least 255 apart "
                    "(each 8-bit level a value of its own)",
                )
        object.__setattr__(self, "value_range", (lo, hi))

    def _check_nodata(self) -> None:
        """``nodata_value``, ``hidden_objects`` and ``alpha`` against the other keys."""
        if self.nodata_mode == "alpha" and self.bands not in (1, 3):
            # GDAL takes the alpha band as the dataset mask for grey + alpha and RGB + alpha only.
            raise _fail("bands", self.bands, "1 or 3 with nodata_mode=alpha (grey or RGB + alpha)")
        nv = self.nodata_value
        if nv is not None:
            if isinstance(nv, bool) or not isinstance(nv, (int, float, np.number)):
                raise _fail("nodata_value", nv, "a number in the dtype's range, e.g. 255")
            nv = float(nv)
            if self.nodata_mode != "value":
                raise _fail("nodata_value", nv, "unset unless nodata_mode=value")
            if self.dtype != "float32":
                info = np.iinfo(self.dtype)
                if not (math.isfinite(nv) and nv == int(nv) and info.min <= nv <= info.max):
                    raise _fail(
                        "nodata_value", nv, f"an integer in {info.min}..{info.max} for {self.dtype}"
                    )
            object.__setattr__(self, "nodata_value", nv)
        if not _is_int(self.hidden_objects) or self.hidden_objects < 0:
            raise _fail("hidden_objects", self.hidden_objects, "an integer >= 0")
        if self.hidden_objects and (self.nodata == "none" or self.nodata_mode == "value"):
            raise ConfigError(
                f"hidden_objects={self.hidden_objects} needs a nodata region whose pixels are "
                "kept under a mask: set nodata=border|rect and nodata_mode=mask|alpha "
                "(under nodata_mode=value its pixels are the nodata value)."
            )

    @property
    def effective_value_range(self) -> tuple[float, float]:
        """``value_range``, or the dtype's default (:data:`DEFAULT_VALUE_RANGES`)."""
        return self.value_range or DEFAULT_VALUE_RANGES[self.dtype]

    @property
    def effective_nodata_value(self) -> float:
        """The file's nodata value with ``nodata_mode="value"``: ``nodata_value`` or the dtype's."""
        return NODATA_VALUES[self.dtype] if self.nodata_value is None else self.nodata_value

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
        raw_bytes: uncompressed pixel bytes, ``width * height * bands * itemsize``.
        objects: the planted objects, by id (those in the truth).
        hidden: the objects planted inside the nodata region (``hidden_objects``; not in the
            truth: under the validity mask, a run must report none of them).
    """

    __test__ = False  # not a pytest test class despite its name

    path: Path
    truth_path: Path | None
    file_bytes: int
    raw_bytes: int
    objects: tuple[PlantedObject, ...]
    hidden: tuple[PlantedObject, ...] = ()

    @property
    def compression_ratio(self) -> float:
        """``raw_bytes / file_bytes`` (> 1 means smaller than raw)."""
        return self.raw_bytes / self.file_bytes if self.file_bytes else float("inf")


_DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(TestImageSpec)}


def map_transform(spec: TestImageSpec) -> Affine:
    """Pixel-corner -> map transform: north-up, upper-left corner at the origin; identity if no CRS.

    Same as ``rasterio.transform.from_origin(origin_x, origin_y, pixel_size, pixel_size)``.
    """
    if spec.crs is None:
        return Affine.identity()
    return Affine.translation(spec.origin_x, spec.origin_y) @ Affine.scale(
        spec.pixel_size, -spec.pixel_size
    )
