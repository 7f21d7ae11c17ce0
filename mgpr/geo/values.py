"""How a raster's sample values become the model's [0, 1] input: carriers, ranges, statistics.

No torch: this module decides *what* to do with the values (which carrier dtype holds them
exactly in shared memory, which ``value_range`` maps them to [0, 1]); the device-side arithmetic
is :mod:`mgpr.data.scaling`.

* :func:`carrier_dtype`: the numpy dtype a run's tiles are read into (integers stay integers).
* :class:`ValueRange`: per selected band, the physical ``[lo, hi]`` that maps to ``[0, 1]`` and,
  folded with the band's GDAL scale/offset, the same map on the raw file values.
* :func:`resolve_value_range`: ``value_range`` (config) + raster -> :class:`ValueRange`, or the
  one-line refusal for a non-uint8 raster without ``value_range``.
* :func:`sample_values`: a decimated read (GDAL picks overviews) for ``value_range=auto`` and for
  the min/max shown in that refusal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mgpr.errors import ConfigError, InputError

#: Raster dtype -> the carrier that holds every value exactly (floats: float32, see module doc).
CARRIERS: dict[str, str] = {
    "uint8": "uint8",
    "int8": "int16",
    "uint16": "uint16",
    "int16": "int16",
    "uint32": "int64",
    "int32": "int32",
    "float16": "float32",
    "float32": "float32",
    "float64": "float32",
}
#: Percentiles of ``value_range=auto``, per band.
AUTO_PERCENTILES = (2.0, 98.0)
#: Longest side of the decimated read behind ``auto`` and the refusal's min/max, pixels.
SAMPLE_SIDE_PX = 1024

#: ``value_range`` after :func:`mgpr.conf.load.check_value_range`: unset, ``auto``, ``[lo, hi]``
#: pairs, or one of those two per raster dtype (``{"uint16": [[0, 4095]], "float32": "auto"}``).
ValueRangeKey = str | list[list[float]] | dict[str, str | list[list[float]]] | None
#: Least share of a given ``[lo, hi]`` that an integer raster's dtype must reach (its whole span
#: of values, through GDAL scale/offset); below, the raster would reach the model as a sliver
#: of its input range (uint8 0..255 under [0, 4095]: 6 %), which is refused.
MIN_REACHABLE_SHARE = 0.5


#: Magnitude from which a float value is no measurement: float32's largest finite value,
#: -3.4028235e38, is the nodata of ESRI's float exports and of many other tools, often left
#: undeclared; with NaN and +-inf it is never a valid value (before, ``value_range=auto`` took
#: it as the 2nd percentile and every real value reached the model as 1).
FLOAT_SENTINEL = float(np.finfo(np.float32).max)


def real_values(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """True where float ``values`` are measurements: finite and below ``FLOAT_SENTINEL``.

    ``axis`` (bands first): a pixel is real when every band is. NaN compares False, so two
    comparisons cover NaN, +-inf and +-3.4028235e38 (no ``abs`` copy: a 3 x 1024^2 float32
    tile takes 1.05 ms, against 0.67 ms for ``isfinite`` alone and 1.86 ms with ``abs``).
    """
    real = values < FLOAT_SENTINEL
    real &= values > -FLOAT_SENTINEL
    return real if axis is None else real.all(axis=axis)


def carrier_dtype(dtypes: Iterable[tuple[str, str]]) -> np.dtype[Any]:
    """The one dtype a run reads every tile into: it holds every input raster's values exactly.

    Integer rasters give the smallest integer dtype holding all of them (uint8 + uint16 ->
    uint16, uint16 + int16 -> int32); any float raster makes it float32 (float64 rasters lose
    precision beyond float32's 24-bit mantissa, as do integers above 2**24 mixed with floats).

    Args:
        dtypes: (path, numpy dtype name of the raster's bands) per input raster.

    Raises:
        InputError: a dtype mgpr does not read (complex, 64-bit integers).
    """
    carriers = []
    for path, name in dtypes:
        carrier = CARRIERS.get(name)
        if carrier is None:
            convert = f"`gdal_translate -ot Float32 {path} out.tif`"
            if name.startswith("complex"):  # SAR: -ot Float32 would keep the real part only
                convert = (
                    f'its amplitude, `gdal_calc.py -A {path} --allBands=A --calc="abs(A)" '
                    "--type=Float32 --outfile=amplitude.tif` (-ot Float32 would keep only the "
                    "real part)"
                )
            raise InputError(
                f"{path!r} has dtype {name}, which mgpr does not read (it reads "
                f"{', '.join(CARRIERS)}); convert it, e.g. {convert}"
            )
        carriers.append(np.dtype(carrier))
    if not carriers:
        return np.dtype(np.uint8)
    if any(c.kind == "f" for c in carriers):
        return np.dtype(np.float32)
    out = carriers[0]
    for c in carriers[1:]:
        out = np.promote_types(out, c)
    return out


@dataclass(frozen=True, slots=True)
class ValueRange:
    """How the selected bands of one raster map to the model's [0, 1] input.

    ``unit = (physical - lo) / (hi - lo)`` clipped to [0, 1], with ``physical = raw * scale +
    offset`` (GDAL band metadata; 1 and 0 without). Folded on the raw values this is
    ``(raw - raw_lo) / raw_span`` with ``raw_lo = (lo - offset) / scale`` and ``raw_span =
    (hi - lo) / scale``, which is what the device computes.

    Attributes:
        lo: per selected band, the physical value that becomes 0.
        hi: per selected band, the physical value that becomes 1.
        source: ``default`` (uint8 -> [0, 255]), ``value_range`` (given) or ``auto``.
        scale: per selected band, GDAL scale (1.0 without).
        offset: per selected band, GDAL offset (0.0 without).
    """

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    source: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]

    @property
    def raw_lo(self) -> tuple[float, ...]:
        """Per band, the raw file value that becomes 0."""
        return tuple(
            (lo - o) / s for lo, o, s in zip(self.lo, self.offset, self.scale, strict=True)
        )

    @property
    def raw_span(self) -> tuple[float, ...]:
        """Per band, raw file units per unit of model input (negative for a negative scale)."""
        return tuple((hi - lo) / s for lo, hi, s in zip(self.lo, self.hi, self.scale, strict=True))

    def pairs(self) -> list[list[float]]:
        """``[[lo, hi], ...]`` per band, physical units (what run.json and summary.json hold)."""
        return [[lo, hi] for lo, hi in zip(self.lo, self.hi, strict=True)]


def _band_scale_offset(info: Any, bands: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    scales = tuple(float(info.scales[b - 1]) if info.scales else 1.0 for b in bands)
    offsets = tuple(float(info.offsets[b - 1]) if info.offsets else 0.0 for b in bands)
    return scales, offsets


def range_of_raster(info: Any, value_range: ValueRangeKey) -> str | list[list[float]] | None:
    """The part of ``value_range`` that applies to ``info``: its dtype's entry when keyed by dtype.

    Raises:
        ConfigError: a per-dtype ``value_range`` naming neither the raster's dtype nor, for a
            uint8 raster, leaving it to its default.
    """
    if not isinstance(value_range, dict):
        return value_range
    mine = value_range.get(info.dtype)
    if mine is None and info.dtype != "uint8":
        raise ConfigError(
            f"{info.path!r} has dtype {info.dtype}, which value_range (given for "
            f"{', '.join(value_range)}) does not name; add a range for it, e.g. "
            f"{info.dtype}:[lo,hi] or {info.dtype}:auto"
        )
    return mine


def resolve_value_range(
    info: Any,
    bands: Sequence[int],
    value_range: ValueRangeKey,
    sample: Any = None,
    run_dtypes: Sequence[str] = (),
) -> ValueRange:
    """The :class:`ValueRange` of one raster's selected bands.

    Args:
        info: the raster (:class:`mgpr.geo.raster.RasterInfo`).
        bands: the 1-based bands read (their order is the model's band order).
        value_range: ``None`` (uint8 only: [0, 255] on the raw values), ``"auto"`` (per band
            2nd-98th percentiles of a decimated read, physical units), or ``[lo, hi]`` pairs in
            physical units: one for every band, or one per selected band; or a dict of those
            per raster dtype (:func:`range_of_raster`).
        sample: ``sample_values``-like callable ``(path, bands) -> list of 1-D arrays``; tests and
            the refusal share it. Defaults to :func:`sample_values`.
        run_dtypes: every input raster's dtype, for the refusal's per-dtype example.

    Raises:
        ConfigError: a non-uint8 raster without ``value_range`` (one line with each band's
            min/max) or with a per-dtype ``value_range`` not naming its dtype, a pair count that
            fits neither all bands nor each band, a constant band under ``auto``, a zero GDAL
            scale, or an integer raster whose dtype reaches under half of a given range.
    """
    sample = sample or sample_values
    scales, offsets = _band_scale_offset(info, bands)
    if any(s == 0 or not math.isfinite(s) for s in scales):
        raise ConfigError(
            f"{info.path!r} has GDAL scale {scales} on bands {list(bands)}: a zero or non-finite "
            "scale maps every value to one; fix the metadata (gdal_edit.py -scale)"
        )
    n = len(bands)
    value_range = range_of_raster(info, value_range)
    if value_range is None:
        if info.dtype != "uint8":
            raise ConfigError(unscaled_refusal(info, bands, sample))
        top = float(integer_span(info)[1])  # 255, or 1 for a 1-bit (NBITS=1) raster
        return ValueRange((0.0,) * n, (top,) * n, "default", (1.0,) * n, (0.0,) * n)
    if value_range == "auto":
        lo, hi = [], []
        for band, values in zip(bands, sample(info.path, bands), strict=True):
            if values.size == 0:
                raise ConfigError(
                    f"value_range=auto: band {band} of {info.path!r} has no valid pixel in a "
                    "decimated read; give value_range=[lo,hi]"
                )
            p_lo, p_hi = (float(v) for v in np.percentile(values, AUTO_PERCENTILES))
            if not p_hi > p_lo:
                raise ConfigError(
                    f"value_range=auto: band {band} of {info.path!r} is constant in its 2nd-98th "
                    f"percentiles ({p_lo:g}); give value_range=[lo,hi] for it"
                )
            lo.append(p_lo)
            hi.append(p_hi)
        return ValueRange(tuple(lo), tuple(hi), "auto", scales, offsets)
    pairs = list(value_range)
    if len(pairs) == 1:
        pairs = pairs * n
    if len(pairs) != n:
        raise ConfigError(
            f"value_range has {len(pairs)} [lo,hi] pairs but {info.path!r} is read as {n} "
            f"band(s) {list(bands)}; give one pair for all bands (value_range=[lo,hi]) or one "
            "per band"
        )
    given = ValueRange(
        tuple(float(p[0]) for p in pairs),
        tuple(float(p[1]) for p in pairs),
        "value_range",
        scales,
        offsets,
    )
    _refuse_unreachable(info, bands, given, run_dtypes)
    return given


def _refuse_unreachable(
    info: Any, bands: Sequence[int], given: ValueRange, run_dtypes: Sequence[str]
) -> None:
    """Refuse a given range most of which an integer raster's dtype cannot reach.

    Data-free: an integer dtype's values span a known interval (uint8 0..255, through the band's
    GDAL scale/offset in physical units), so a ``[lo, hi]`` reachable over less than
    :data:`MIN_REACHABLE_SHARE` of its width maps the whole raster onto a sliver of the model's
    [0, 1] input: the range was meant for other rasters (a 12-bit range over a folder that also
    holds 8-bit orthos) or for other units. Floats have no such interval and are not checked.
    """
    if info.dtype not in CARRIERS or np.dtype(info.dtype).kind not in "ui":
        return
    low, high = integer_span(info)
    for band, lo, hi, scale, offset in zip(
        bands, given.lo, given.hi, given.scale, given.offset, strict=True
    ):
        ends = sorted((low * scale + offset, high * scale + offset))
        reached = max(0.0, min(hi, ends[1]) - max(lo, ends[0])) / (hi - lo)
        if reached >= MIN_REACHABLE_SHARE:
            continue
        bits = f" with NBITS={info.nbits}" if info.nbits else ""
        start = (
            f"value_range [{lo:g}, {hi:g}] for band {band} of {info.path!r} ({info.dtype}{bits}: "
            f"values {ends[0]:g}..{ends[1]:g}"
        )
        if (scale, offset) != (1.0, 0.0):
            # value_range is in physical units; a range of raw counts, read through the
            # band's scale, is the likeliest meaning
            phys = sorted((lo * scale + offset, hi * scale + offset))
            raise ConfigError(
                f"{start} through its GDAL scale {scale:g} and offset {offset:g}) lies "
                f"{1 - reached:.0%} beyond what that dtype holds; value_range is in physical "
                "units (raw * scale + offset): for raw counts "
                f"[{lo:g}, {hi:g}] give value_range=[{phys[0]:g},{phys[1]:g}], or "
                "value_range=auto"
            )
        raise ConfigError(
            f"{start}) lies {1 - reached:.0%} beyond what that dtype holds, so the raster "
            "would reach the model as a sliver of its input; give each dtype its own range, "
            f"e.g. {_per_dtype_example(info, lo, hi, run_dtypes)}, or value_range=auto"
        )


def _per_dtype_example(info: Any, lo: float, hi: float, run_dtypes: Sequence[str]) -> str:
    """``'value_range={uint16:[0,4095]}'``: the given range kept for the run's other dtypes.

    The refused raster's dtype is left out when it is uint8 (it then keeps its default range),
    else given the span its values can take (:func:`integer_span`) as a placeholder the user
    edits.
    """
    dtype = info.dtype
    parts = [f"{d}:[{lo:g},{hi:g}]" for d in dict.fromkeys(run_dtypes) if d != dtype]
    low, high = integer_span(info)
    if dtype == "uint8" and parts:
        kept = f"(uint8, not named, keeps [0, {high}])"
        return "'value_range={" + ",".join(parts) + "}' " + kept
    parts.append(f"{dtype}:[{low},{high}]")
    return "'value_range={" + ",".join(parts) + "}'"


def integer_span(info: Any) -> tuple[int, int]:
    """The raw values an integer raster can hold: its dtype's, or ``0 .. 2**nbits - 1``.

    GDAL's ``NBITS`` (:attr:`mgpr.geo.raster.RasterInfo.nbits`) narrows the dtype: a 1-bit
    GeoTIFF is uint8 holding 0..1, 12-bit camera data uint16 holding 0..4095.
    """
    nbits = getattr(info, "nbits", None)
    if nbits:
        return 0, 2**nbits - 1
    limits = np.iinfo(np.dtype(info.dtype))
    return int(limits.min), int(limits.max)


def unscaled_refusal(info: Any, bands: Sequence[int], sample: Any = None) -> str:
    """The one line refusing a non-uint8 raster without ``value_range``, with band min/max.

    Min/max come from the band's GDAL statistics tags (``STATISTICS_MINIMUM``/``MAXIMUM``) where
    the file has them, else from a decimated read; physical units (scale/offset applied).
    """
    sample = sample or sample_values
    ranges = _tagged_min_max(info.path, bands)
    if ranges is None:
        ranges = []
        for values in sample(info.path, bands):
            ranges.append((float(values.min()), float(values.max())) if values.size else None)
    shown = ", ".join(
        f"band {b}: {'no valid pixel' if r is None else f'{r[0]:g}..{r[1]:g}'}"
        for b, r in zip(bands, ranges, strict=True)
    )
    if all(r is None for r in ranges):
        # auto needs valid pixels: suggesting it would only lead to the next refusal
        return (
            f"{info.path!r} has dtype {info.dtype} and no valid pixel in a decimated read "
            f"({shown}: nodata or masked everywhere read); check its nodata value, remove it "
            "from input_path, or set value_range=[lo,hi] to predict it anyway"
        )
    bits = ""
    if getattr(info, "nbits", None):  # 12-bit camera data: its full scale is a good start
        bits = f", NBITS={info.nbits}: values 0..{integer_span(info)[1]}"
    return (
        f"{info.path!r} has dtype {info.dtype} ({shown}{bits}) and mgpr does not guess how its "
        "values map to the model's [0, 1] input: set value_range=[lo,hi] (all bands), "
        "value_range=[[lo,hi],...] (one pair per band) or value_range=auto (2nd-98th percentiles)"
    )


def _tagged_min_max(path: str, bands: Sequence[int]) -> list[tuple[float, float] | None] | None:
    """Per band (min, max) from GDAL statistics tags, physical units; None when any is missing."""
    import rasterio

    out: list[tuple[float, float] | None] = []
    with rasterio.open(path) as src:
        for band in bands:
            tags = src.tags(band)
            if "STATISTICS_MINIMUM" not in tags or "STATISTICS_MAXIMUM" not in tags:
                return None
            # GDAL computes statistics on the raw values.
            s, o = src.scales[band - 1] or 1.0, src.offsets[band - 1] or 0.0
            lo, hi = (float(tags[k]) * s + o for k in ("STATISTICS_MINIMUM", "STATISTICS_MAXIMUM"))
            out.append((min(lo, hi), max(lo, hi)))
    return out


def sample_values(
    path: str, bands: Sequence[int], side_px: int = SAMPLE_SIDE_PX
) -> list[np.ndarray]:
    """Valid values of each band from a read decimated to at most ``side_px`` on its long side.

    GDAL answers a decimated read from the overview nearest in size (nearest-neighbour, so the
    values are real samples); without overviews it decodes every block once. Deterministic: every
    rank computing it from the same file gets the same values. Nodata, masked and non-finite
    pixels are left out, as is float32's largest magnitude (:data:`FLOAT_SENTINEL`); GDAL
    scale/offset is applied (physical units).

    Returns:
        Per band (in ``bands`` order) a 1-D float64 array of valid physical values.
    """
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        factor = max(1.0, max(src.height, src.width) / side_px)
        shape = (len(bands), max(1, round(src.height / factor)), max(1, round(src.width / factor)))
        data = src.read(
            indexes=list(bands), out_shape=shape, masked=True, resampling=Resampling.nearest
        )
        scales = [src.scales[b - 1] or 1.0 for b in bands]
        offsets = [src.offsets[b - 1] or 0.0 for b in bands]
    out = []
    for i in range(len(bands)):
        band = data[i]
        values = np.asarray(band.compressed() if np.ma.isMaskedArray(band) else band.ravel())
        if values.dtype.kind == "f":
            values = values[real_values(values)]
        values = values.astype(np.float64) * scales[i] + offsets[i]
        out.append(values[np.isfinite(values)])
    return out
