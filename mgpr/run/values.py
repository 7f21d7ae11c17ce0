"""How each raster's values reach the model: ``value_range`` resolved per raster.

Resolved once by rank 0 and told to the others through the process group under ``srun``
(:func:`mgpr.run.rendezvous.decided`); ranks started by Lightning's launcher resolve the same
ranges themselves (``value_range=auto`` reads the same decimated samples from the same files:
:func:`mgpr.geo.values.sample_values` is deterministic). Rank 0 prints the resolved ranges;
``run.json`` (the fingerprint) and ``summary.json`` record them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import ConfigError
from mgpr.geo.raster import RasterInfo
from mgpr.geo.values import ValueRange, range_of_raster, resolve_value_range, unscaled_refusal

log = logging.getLogger("mgpr")


def refuse_unscaled_early(cfg: PredictConfig, rasters: Sequence[RasterInfo]) -> None:
    """Refuse a non-uint8 raster without ``value_range`` (for its dtype) before the model is built.

    Only for the built-in models (none of them takes raw values); a custom model may ask for
    raw values, which :func:`resolve_value_ranges` sees once it is built. Given pairs are
    checked against each raster (their count, their reach) there, before any tile.

    Raises:
        ConfigError: one line naming ``value_range`` with each band's min/max, or the dtype a
            per-dtype ``value_range`` leaves out.
        InputError: a dtype mgpr does not read (int64), said first: a range would not help.
    """
    from mgpr.geo.values import carrier_dtype

    carrier_dtype((r.path, r.dtype) for r in rasters)
    for info in rasters:
        if range_of_raster(info, cfg.value_range) is None and info.dtype != "uint8":
            from mgpr.geo.bands import resolve_band

            # names (bands=[red,green,blue]) as indexes; a band the raster lacks is refused here
            asked = cfg.bands or list(range(1, info.count + 1))
            line = unscaled_refusal(info, [resolve_band(info, b, asked) for b in asked])
            dtypes = sorted({r.dtype for r in rasters})
            if len(dtypes) > 1 and not isinstance(cfg.value_range, dict):
                line += (
                    f"; these inputs mix dtypes ({', '.join(dtypes)}): key the ranges by dtype, "
                    f"e.g. 'value_range={{{info.dtype}:[lo,hi]}}'"
                    + (" (uint8 keeps [0, 255])" if "uint8" in dtypes else "")
                )
            raise ConfigError(line)


def resolve_value_ranges(
    cfg: PredictConfig,
    rasters: Sequence[RasterInfo],
    bands: dict[str, list[int]],
    adapter: Any,
    rank: int,
) -> dict[str, ValueRange] | None:
    """Each raster's :class:`ValueRange` (None when the adapter takes raw values).

    Raises:
        ConfigError: see :func:`mgpr.geo.values.resolve_value_range`; also ``value_range`` given
            for a model that takes raw values (it would be ignored).
    """
    if adapter.input_range == "raw":
        if cfg.value_range is not None:
            raise ConfigError(
                f"model={adapter.name} takes raw values (input_range='raw'), so "
                f"value_range={cfg.value_range} would be ignored; remove value_range"
            )
        if rank == 0:
            log.info("model=%s takes raw values: no value_range is applied", adapter.name)
        return None
    dtypes = [r.dtype for r in rasters]
    ranges = {
        r.path: resolve_value_range(r, bands[r.path], cfg.value_range, run_dtypes=dtypes)
        for r in rasters
    }
    if rank == 0:
        notes: list[tuple[str, str]] = []
        for path, vr in ranges.items():
            if vr.source == "default":
                continue
            what = "auto: 2nd-98th percentiles" if vr.source == "auto" else "given"
            shown = ", ".join(
                f"band {b} [{lo:g}, {hi:g}]"
                for b, lo, hi in zip(bands[path], vr.lo, vr.hi, strict=True)
            )
            scaled = (
                ""
                if set(vr.scale) == {1.0} and set(vr.offset) == {0.0}
                else " (after GDAL scale/offset)"
            )
            notes.append((what, f"value_range ({what}) of {path}: {shown}{scaled}"))
        from mgpr.run.input_warnings import log_notes

        log_notes(notes, "input(s) with their value_range (summary.json values)")
    return ranges
