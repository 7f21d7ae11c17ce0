"""Which raster bands a model gets, by index or by name.

``bands=`` takes 1-based indexes (``[4,3,2]``) or names (``[red,green,blue]``, ``[B8,B4,B3]``):
a name matches a band's colour interpretation or its description, case-insensitively. Without
``bands=`` an RGB model gets the bands whose colour interpretation is red, green and blue when a
raster has all three (so a blue-green-red-NIR file does not feed blue to the red channel), else
the first three; a band-agnostic model gets every band except alpha (an alpha band is a mask,
never model input). A paletted raster (colour-table indexes) is refused with the GDAL command
that expands it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mgpr.errors import ConfigError
from mgpr.geo.raster import RasterInfo

log = logging.getLogger(__name__)

_RGB = ("red", "green", "blue")


def band_labels(info: RasterInfo) -> list[str]:
    """One label per band for messages: ``1:red``, ``4:B8/undefined``."""
    labels = []
    for i in range(info.count):
        names = [n for n in (_desc(info, i), _interp(info, i)) if n]
        labels.append(f"{i + 1}:{'/'.join(names) or '?'}")
    return labels


def _interp(info: RasterInfo, i: int) -> str:
    return info.colorinterp[i] if i < len(info.colorinterp) else ""


def _desc(info: RasterInfo, i: int) -> str:
    return info.descriptions[i] if i < len(info.descriptions) else ""


def resolve_band(info: RasterInfo, band: int | str, asked: Sequence[int | str] = ()) -> int:
    """A 1-based band index for one ``bands=`` entry (an index, or a name of this raster).

    ``asked`` is the whole ``bands=`` list, quoted in the error messages.
    """
    key = f"bands={list(asked)}" if asked else "bands="
    if isinstance(band, int):
        if not 1 <= band <= info.count:
            raise ConfigError(
                f"{key} names band {band}, but {info.path!r} has {info.count} band(s); "
                f"use indexes 1..{info.count} or names ({', '.join(band_labels(info))})"
            )
        return band
    wanted = band.strip().lower()
    for matches in (
        [i for i in range(info.count) if _desc(info, i).lower() == wanted],
        [i for i in range(info.count) if _interp(info, i) == wanted],
    ):
        if len(matches) == 1:
            return matches[0] + 1
        if len(matches) > 1:
            raise ConfigError(
                f"{key}: {band!r} matches bands {[m + 1 for m in matches]} of "
                f"{info.path!r}; pick them by index"
            )
    raise ConfigError(
        f"{key}: {band!r} matches no band of {info.path!r} (its bands: "
        f"{', '.join(band_labels(info))}); use a colour interpretation, a band description "
        "or an index"
    )


def _refuse_palette(info: RasterInfo) -> None:
    """Refuse a paletted raster: its pixels are colour-table indexes, not brightness.

    A model fed the indexes sees noise however the bands are picked (``bands=[1,1,1]`` repeats
    the indexes), so the run stops before any tile with the GDAL command that expands the
    colour table into real bands.
    """
    palette = [i + 1 for i in range(info.count) if _interp(info, i) == "palette"]
    if palette and _black_and_white_bits(info, palette[0]):
        return  # GDAL's own table of a 1-bit band: 0 black, 1 white, i.e. brightness [0, 1]
    if palette:
        src = Path(info.path)
        rgb = src.with_name(f"{src.stem}_rgb.tif")
        raise ConfigError(
            f"{info.path!r} is a paletted image (band {palette[0]} holds colour-table indexes, "
            "not brightness), which a model cannot read; expand it first, e.g. "
            f"gdal_translate -expand rgb {src} {rgb} (or -expand gray for a grey table)"
        )


def _black_and_white_bits(info: RasterInfo, band: int) -> bool:
    """A 1-bit band whose colour table is black (0) and white (1): GDAL's default for NBITS=1.

    GDAL gives every one-band 1-bit GeoTIFF that table, so the file reads as paletted although
    its values are brightness (0..1, read by ``[0, 1]``: :func:`mgpr.geo.values.integer_span`).
    """
    if info.nbits != 1:
        return False
    import rasterio

    try:
        with rasterio.open(info.path) as src:
            table = src.colormap(band)
    except (rasterio.errors.RasterioError, ValueError):
        return False
    return table.get(0, (0, 0, 0))[:3] == (0, 0, 0) and table.get(1, ())[:3] == (255, 255, 255)


def _band_span(bands: Sequence[int]) -> str:
    """``1..3`` for consecutive indexes, else ``1, 2, 4``."""
    if bands and list(bands) == list(range(bands[0], bands[-1] + 1)):
        return f"{bands[0]}..{bands[-1]}"
    return ", ".join(str(b) for b in bands)


def _example_bands(count: int, needed: int) -> str:
    """A ``bands=`` value with ``needed`` entries from a ``count``-band raster, last repeated.

    The example in a band-count error must be one the model accepts: ``[1,1,1]`` for a 4-band
    model on an RGB raster was refused in turn (3 entries for 4 bands).
    """
    picks = [min(i, max(count, 1)) for i in range(1, needed + 1)]
    return "[" + ",".join(str(i) for i in picks) + "]"


def check_bands(
    info: RasterInfo,
    bands: Sequence[int | str] | None,
    needed: int,
    notes: list[tuple[str, str]] | None = None,
) -> list[int]:
    """Pick the 1-based band indexes to read and check them against the raster and model.

    Args:
        info: the raster.
        bands: the user's ``bands`` key (indexes and/or names) or None.
        needed: bands the model needs, 0 when it takes any count.
        notes: where to put the default choice's note (``(kind, line)``: by colour
            interpretation, or the first bands of more) instead of logging it; a caller over
            20,000 chips logs a few of each kind (:func:`mgpr.run.input_warnings.log_a_few`).

    Returns:
        The band indexes (1-based), see the module docstring for the defaults.

    Raises:
        ConfigError: a band the raster lacks, a name it does not have, or a count the model
            cannot take, or a paletted raster (:func:`_refuse_palette`).
    """
    _refuse_palette(info)
    alpha = {i + 1 for i in range(info.count) if _interp(info, i) == "alpha"}
    if bands is not None:
        chosen = [resolve_band(info, b, bands) for b in bands]
        if needed and len(chosen) != needed:
            raise ConfigError(
                f"bands={list(bands)} selects {len(chosen)} band(s), but the model needs "
                f"{needed}; pass e.g. bands=[{','.join(str(i) for i in range(1, needed + 1))}]"
            )
        picked_alpha = [b for b in chosen if b in alpha]
        if picked_alpha:
            # An alpha band is the validity mask (0 = no data): read as imagery it is a flat
            # 255 with black where the raster has no data, which no model was trained on.
            image = [b for b in range(1, info.count + 1) if b not in alpha]
            raise ConfigError(
                f"bands={list(bands)} names band {picked_alpha[0]}, which is {info.path!r}'s "
                f"alpha band (its validity mask, applied to every tile, not imagery); pick "
                f"image bands {_band_span(image)}"
            )
        return chosen
    if needed == 0:
        return [b for b in range(1, info.count + 1) if b not in alpha] or [1]
    if info.count < needed:
        raise ConfigError(
            f"{info.path!r} has {info.count} band(s), but the model needs {needed}; "
            f"pick bands with e.g. bands={_example_bands(info.count, needed)} or use a model "
            "for that band count"
        )
    if needed == 3 and all(c in info.colorinterp for c in _RGB):
        rgb = [info.colorinterp.index(c) + 1 for c in _RGB]
        if rgb != [1, 2, 3] or info.count > 3:
            _note(
                notes,
                "by colour interpretation",
                f"{info.path}: bands {rgb} by colour interpretation (red, green, blue) for a "
                "3-band model",
            )
        return rgb
    if info.count > needed:
        _note(
            notes,
            f"first {needed} bands",
            f"{info.path} has {info.count} bands; reading bands 1..{needed}",
        )
    return list(range(1, needed + 1))


def _note(notes: list[tuple[str, str]] | None, kind: str, line: str) -> None:
    if notes is None:
        log.info("%s", line)
    else:
        notes.append((kind, line))
