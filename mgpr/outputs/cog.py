"""Raster output: per-rank part GeoTIFFs, a VRT over them, one Cloud-Optimized GeoTIFF per input.

Parts. A part raster holds a rectangle of final pixels (the owned cores of neighbouring tiles
of one tile row, see :mod:`mgpr.tasks.segmentation`) in RASTER pixel coordinates, with its offset
stored in the file's tags (``MGPR_ROW_OFF``, ``MGPR_COL_OFF``): the rank's part writer publishes
it (temp name, fsync, rename) before the manifest that lists its tiles. Parts carry no
georeferencing; the VRT places them.

Assembly. :func:`assemble_cog` writes a VRT (XML, written here: rasterio has no VRT builder and
GDAL's Python bindings are not a dependency) whose sources are the parts, on the input's grid
(same CRS, transform, width, height); pixels no part covers read as the nodata value. GDAL's COG
driver then streams the VRT into ``<final>.tmp`` block by block (``rasterio.shutil.copy``) and the
file is renamed into place: memory is bounded by ``GDAL_CACHEMAX`` (:data:`ASSEMBLY_CACHE_BYTES`),
never by the raster size. Temporary disk: the COG driver first writes the overviews to a temp
file beside the output (about a third of the output's size), then the output itself.

Encoding: 512 px internal tiles, DEFLATE with the horizontal predictor, overviews down to a few
hundred pixels resampled with MODE (class maps) or AVERAGE (probabilities), BigTIFF when needed.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

log = logging.getLogger(__name__)

#: Internal tile (block) edge of the COGs, pixels.
COG_BLOCK_PX = 512
#: GDAL block cache while assembling, bytes: bounds the assembly's memory whatever the raster.
#: 64 MiB assembles a 16,384 px class map as fast as 256 MiB did (7.1 vs 7.9 s) with 150 MiB
#: less RSS (benchmarks/segmentation.py --assembly).
ASSEMBLY_CACHE_BYTES = 64 * 1024 * 1024
#: Tags of a part GeoTIFF giving its offset in the input raster, pixels.
ROW_OFF_TAG = "MGPR_ROW_OFF"
COL_OFF_TAG = "MGPR_COL_OFF"

_GDAL_TYPES = {
    np.dtype(np.uint8): "Byte",
    np.dtype(np.uint16): "UInt16",
    np.dtype(np.float32): "Float32",
}


@dataclass(frozen=True, slots=True)
class PartRaster:
    """A rectangle of a part raster placed in the input raster (one VRT source).

    Attributes:
        path: the part GeoTIFF.
        row_off: pixels, first raster row it covers.
        col_off: pixels, first raster column it covers.
        height: pixels (rows).
        width: pixels (columns).
        src_row_off: pixels, first row of the rectangle inside the part file.
        src_col_off: pixels, first column of the rectangle inside the part file.
    """

    path: Path
    row_off: int
    col_off: int
    height: int
    width: int
    src_row_off: int = 0
    src_col_off: int = 0


@dataclass(frozen=True, slots=True)
class Grid:
    """The input raster's grid that the COG reproduces.

    Attributes:
        height: pixels (rows).
        width: pixels (columns).
        transform: pixel -> map affine of the input (identity for rasters without one).
        crs_wkt: the input's CRS as WKT, or None (pixel coordinates).
        georef_source: an input on this very grid georeferenced by ground control points or
            RPCs instead of a transform, whose GCPs / RPCs the COG carries too, so it overlays
            and warps like its input (QGIS, gdalwarp); None otherwise.
    """

    height: int
    width: int
    transform: Affine
    crs_wkt: str | None
    georef_source: str | None = None


def class_id_dtype(n_classes: int) -> tuple[np.dtype[np.generic], int]:
    """Class map dtype and nodata value: uint8/255 for up to 255 classes, else uint16/65535."""
    if n_classes <= 255:
        return np.dtype(np.uint8), 255
    return np.dtype(np.uint16), 65535


def class_colours(n_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """A colour per class id (RGBA 0..255): distinct hues by the golden ratio, class 0 grey.

    Deterministic, so the same class has the same colour in every run and in ``preview.png``.
    """
    colours: dict[int, tuple[int, int, int, int]] = {0: (128, 128, 128, 255)}
    for i in range(1, n_classes):
        hue = (0.13 + (i - 1) * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        colours[i] = (round(r * 255), round(g * 255), round(b * 255), 255)
    return colours


def write_part(
    path: Path,
    data: npt.NDArray[np.generic],
    row_off: int,
    col_off: int,
    nodata: float | None,
) -> None:
    """Write one part raster (no rename here: the part writer publishes the file).

    Args:
        path: where to write (the publisher's temp name).
        data: (bands, rows, cols) pixels, uint8/uint16/float32.
        row_off: pixels, the part's first raster row (stored as a tag).
        col_off: pixels, its first raster column.
        nodata: the nodata value to record, or None.
    """
    bands, height, width = data.shape
    tiled = height >= 256 and width >= 256
    profile: dict[str, object] = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": bands,
        "dtype": data.dtype.name,
        "compress": "deflate",
        "zlevel": 1,  # fast: parts are temporary
        "predictor": 2 if data.dtype.kind in "ui" else 3,
        "nodata": nodata,
        "interleave": "band" if bands > 1 else "pixel",
    }
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # parts are placed by the VRT
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(**{ROW_OFF_TAG: str(row_off), COL_OFF_TAG: str(col_off)})


def read_part(path: Path) -> PartRaster:
    """The placement of a published part raster (its header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = rasterio.open(path)
    with src:
        tags = src.tags()
        return PartRaster(
            path, int(tags[ROW_OFF_TAG]), int(tags[COL_OFF_TAG]), src.height, src.width
        )


def _vrt_xml(
    parts: Sequence[PartRaster],
    grid: Grid,
    bands: int,
    dtype: np.dtype[np.generic],
    nodata: float | None,
    descriptions: Sequence[str],
    colours: dict[int, tuple[int, int, int, int]] | None,
    category_names: Sequence[str] | None,
    tags: dict[str, str] | None,
    mask_from: tuple[Path, int] | None = None,
) -> str:
    gdal_type = _GDAL_TYPES[np.dtype(dtype)]
    t = grid.transform
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if tags:
        lines.append("  <Metadata>")
        lines.extend(f'    <MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in tags.items())
        lines.append("  </Metadata>")
    if grid.crs_wkt:
        lines.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(grid.crs_wkt)}</SRS>')
    if not t.is_identity:
        gt = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
        lines.append(f"  <GeoTransform>{gt}</GeoTransform>")
    if grid.georef_source is not None:
        lines.extend(_gcp_and_rpc_xml(grid.georef_source))
    for band in range(1, bands + 1):
        lines.append(
            f'  <VRTRasterBand dataType="{gdal_type}" band="{band}" '
            f'blockXSize="{COG_BLOCK_PX}" blockYSize="{COG_BLOCK_PX}">'
        )
        if band <= len(descriptions):
            lines.append(f"    <Description>{escape(descriptions[band - 1])}</Description>")
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        if colours is not None and band == 1:
            lines.append("    <ColorInterp>Palette</ColorInterp>")
            lines.append("    <ColorTable>")
            size = (int(nodata) + 1) if nodata is not None and nodata <= 255 else max(colours) + 1
            for i in range(size):
                r, g, b, a = colours.get(i, (0, 0, 0, 0))
                lines.append(f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>')
            lines.append("    </ColorTable>")
        if category_names is not None and band == 1:
            lines.append("    <CategoryNames>")
            lines.extend(f"      <Category>{escape(n)}</Category>" for n in category_names)
            lines.append("    </CategoryNames>")
        for part in parts:
            lines.append(
                "    <SimpleSource>"
                f'<SourceFilename relativeToVRT="0">{escape(str(part.path))}</SourceFilename>'
                f"<SourceBand>{band}</SourceBand>"
                f'<SrcRect xOff="{part.src_col_off}" yOff="{part.src_row_off}" '
                f'xSize="{part.width}" ySize="{part.height}"/>'
                f'<DstRect xOff="{part.col_off}" yOff="{part.row_off}" '
                f'xSize="{part.width}" ySize="{part.height}"/>'
                "</SimpleSource>"
            )
        lines.append("  </VRTRasterBand>")
    if mask_from is not None:
        lines.extend(_mask_band_xml(*mask_from))
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _mask_band_xml(class_map: Path, nodata: int) -> list[str]:
    """A dataset mask: 0 where ``class_map``'s band 1 is ``nodata``, 255 elsewhere.

    GDAL's LUT interpolates between its entries and holds the last one beyond them, so
    ``0:255, nodata-1:255, nodata:0, nodata+1:255`` is exactly "not nodata". The COG driver
    writes it as the file's internal mask (QGIS and GDAL then leave those pixels out).
    """
    entries = [(0, 255), (nodata - 1, 255), (nodata, 0), (nodata + 1, 255)]
    lut = ",".join(f"{v}:{m}" for v, m in entries if v >= 0)
    return [
        "  <MaskBand>",
        '    <VRTRasterBand dataType="Byte">',
        "      <ComplexSource>"
        f'<SourceFilename relativeToVRT="0">{escape(str(class_map))}</SourceFilename>'
        f"<SourceBand>1</SourceBand><LUT>{lut}</LUT></ComplexSource>",
        "    </VRTRasterBand>",
        "  </MaskBand>",
    ]


def _gcp_and_rpc_xml(path: str) -> list[str]:
    """VRT lines giving the COG the GCPs (with their CRS) and RPCs of the input ``path``.

    A class map of a GCP- or RPC-referenced scan or satellite scene is on the input's pixel
    grid; without them it had neither CRS nor transform and could not be overlaid.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            gcps, gcp_crs = src.gcps
            rpc = src.tags(ns="RPC")
    lines: list[str] = []
    if gcps:
        projection = escape(gcp_crs.to_wkt(), {'"': "&quot;"}) if gcp_crs else ""
        lines.append(f'  <GCPList Projection="{projection}" dataAxisToSRSAxisMapping="1,2">')
        for gcp in gcps:
            lines.append(
                f'    <GCP Id="{escape(str(gcp.id or ""), {chr(34): "&quot;"})}" '
                f'Pixel="{float(gcp.col)!r}" Line="{float(gcp.row)!r}" X="{float(gcp.x)!r}" '
                f'Y="{float(gcp.y)!r}" Z="{float(gcp.z or 0.0)!r}"/>'
            )
        lines.append("  </GCPList>")
    if rpc:
        lines.append('  <Metadata domain="RPC">')
        lines.extend(f'    <MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in rpc.items())
        lines.append("  </Metadata>")
    return lines


#: GDAL's side file of what a GeoTIFF cannot hold (category names), next to the COG.
AUX_SUFFIX = ".aux.xml"


def assemble_cog(
    final: Path,
    parts: Sequence[PartRaster],
    grid: Grid,
    *,
    bands: int,
    dtype: np.dtype[np.generic],
    nodata: float | None,
    resampling: str,
    descriptions: Sequence[str] = (),
    colours: dict[int, tuple[int, int, int, int]] | None = None,
    category_names: Sequence[str] | None = None,
    tags: dict[str, str] | None = None,
    threads: int | str = "ALL_CPUS",
    mask_from: tuple[Path, int] | None = None,
) -> Path:
    """Stream the parts into one COG at ``final`` (VRT -> COG driver -> temp name -> rename).

    Args:
        final: the output path; it appears whole or not at all.
        parts: the published parts of this raster (non-overlapping rectangles).
        grid: the input raster's grid.
        bands: bands of every part.
        dtype: pixel type of every part.
        nodata: value where no part covers the raster (missing or failed tiles), or None.
        resampling: overview resampling, ``MODE`` (class maps) or ``AVERAGE`` (probabilities).
        descriptions: band descriptions (class names for probability bands).
        colours: colour table of band 1 (class id -> RGBA), or None.
        category_names: class names by id, stored as GDAL category names (in
            ``<final>.aux.xml``: a GeoTIFF has no place for them), or None.
        tags: dataset metadata to store (e.g. ``class_names`` as JSON).
        threads: GDAL compression threads.
        mask_from: ``(class map COG, its nodata)``: the file's internal mask is valid where
            that class map is not nodata (probabilities have no value to spare for nodata:
            every uint8 is a probability), or None: no mask.

    Returns:
        ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    vrt = final.with_name(f".{final.name}.vrt")
    tmp = final.with_name(f".{final.name}.tmp")
    vrt.write_text(
        _vrt_xml(
            parts,
            grid,
            bands,
            dtype,
            nodata,
            descriptions,
            colours,
            category_names,
            tags,
            mask_from,
        ),
        encoding="utf-8",
    )
    options = {
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "YES",
        "BLOCKSIZE": str(COG_BLOCK_PX),
        "OVERVIEW_RESAMPLING": resampling,
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": str(threads),
    }
    # A GeoTIFF holds no category names: GDAL keeps them in its side file <name>.aux.xml
    # (PAM), written by the copy only when there are names, and moved along with the COG.
    pam = category_names is not None
    tmp_aux, final_aux = (
        tmp.with_name(tmp.name + AUX_SUFFIX),
        final.with_name(final.name + AUX_SUFFIX),
    )
    try:
        with rasterio.Env(GDAL_CACHEMAX=ASSEMBLY_CACHE_BYTES, GDAL_PAM_ENABLED=pam):
            rasterio.shutil.copy(str(vrt), str(tmp), driver="COG", **options)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if tmp_aux.exists():
            os.replace(tmp_aux, final_aux)
        else:
            final_aux.unlink(missing_ok=True)  # an earlier run's names must not outlive them
        os.replace(tmp, final)
    finally:
        vrt.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        tmp_aux.unlink(missing_ok=True)
    log.info("wrote %s from %d part rasters", final, len(parts))
    return final


def class_map_tags(categories: Sequence[str], source: str | None = None) -> dict[str, str]:
    """Dataset metadata of a class map: the class names by id (JSON) and its input raster.

    ``source``: the input's path as given (two inputs named ``x.tif`` in two folders give
    ``x.tif`` and ``x_2.tif``: the file itself then says which is which).
    """
    tags = {
        "class_names": json.dumps(list(categories)),
        "nodata_meaning": "input nodata, or a tile that failed",
    }
    if source is not None:
        tags["source"] = source
    return tags
