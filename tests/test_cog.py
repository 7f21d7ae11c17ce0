"""Raster output: part rasters assembled into a valid COG on the input grid, vectorising."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS

from mgpr.outputs.cog import (
    Grid,
    PartRaster,
    assemble_cog,
    class_colours,
    class_map_tags,
    read_part,
    write_part,
)
from mgpr.tasks.vectorize import vectorize_class_map

TRANSFORM = Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 5000000.0)


def _class_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (height // 20 + 1, width // 20 + 1)).astype(np.uint8)
    return np.kron(coarse, np.ones((20, 20), np.uint8))[:height, :width]


def _assemble(
    tmp_path: Path,
    full: np.ndarray,
    skip: tuple[int, int] | None,
    names: list[str] | None = ["background", "crop", "water"],  # noqa: B006 - read only
) -> Path:
    height, width = full.shape
    parts = []
    rows = [(0, 700), (700, height)]
    cols = [(0, 530), (530, width)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            if (i, j) == skip:
                continue
            path = tmp_path / f"part{i}{j}.tif"
            # a part holds more than the core; the source rectangle picks the core
            write_part(path, full[None, r0:r1, c0 : c1 + 3 if c1 < width else c1], r0, c0, 255)
            header = read_part(path)
            assert (header.row_off, header.col_off) == (r0, c0)
            parts.append(PartRaster(path, r0, c0, r1 - r0, c1 - c0))
    grid = Grid(height, width, TRANSFORM, CRS.from_epsg(32633).to_wkt())
    return assemble_cog(
        tmp_path / "out" / "map.tif",
        parts,
        grid,
        bands=1,
        dtype=np.dtype(np.uint8),
        nodata=255,
        resampling="MODE",
        descriptions=("class",),
        colours=class_colours(3),
        category_names=names,
        tags=class_map_tags(names) if names else None,
    )


def test_parts_assemble_into_a_valid_cog_on_the_input_grid(tmp_path: Path) -> None:
    full = _class_map(1500, 1100)
    out = _assemble(tmp_path, full, skip=(1, 1))
    # no temp files left; GDAL keeps category names (which a GeoTIFF cannot hold) in its side file
    assert sorted(p.name for p in out.parent.iterdir()) == ["map.tif", "map.tif.aux.xml"]
    import xml.etree.ElementTree as ET

    band = ET.parse(out.parent / "map.tif.aux.xml").getroot().find("PAMRasterBand[@band='1']")
    assert [c.text for c in band.iter("Category")] == ["background", "crop", "water"]
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["blockxsize"] == src.profile["blockysize"] == 512
        assert src.compression.name.lower() == "deflate"
        assert src.overviews(1) == [2, 4]
        assert (src.height, src.width, src.transform) == (1500, 1100, TRANSFORM)
        assert src.crs == CRS.from_epsg(32633) and src.nodata == 255
        assert src.colormap(1)[1] == class_colours(3)[1]
        assert json.loads(src.tags()["class_names"]) == ["background", "crop", "water"]
        assert src.descriptions == ("class",)
        got = src.read(1)
        overview = src.read(1, out_shape=(375, 275))
    want = full.copy()
    want[700:, 530:] = 255  # the missing part reads as nodata
    np.testing.assert_array_equal(got, want)
    assert set(np.unique(overview)) <= {0, 1, 2, 255}  # MODE keeps class ids


def test_a_cog_without_names_leaves_no_side_file_of_earlier_names(tmp_path: Path) -> None:
    """Rewritten without category names (a probability COG has none), no .aux.xml stays to
    name the new map's classes with the old names."""
    full = _class_map(900, 700)
    out = _assemble(tmp_path, full, skip=None)
    assert (out.parent / "map.tif.aux.xml").is_file()
    out = _assemble(tmp_path, full, skip=None, names=None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["map.tif"]
    with rasterio.open(out) as src:
        assert src.colormap(1)[2] == class_colours(3)[2]


def test_vectorised_polygons_equal_the_class_map_regions(tmp_path: Path) -> None:
    full = _class_map(700, 600, seed=3)
    full[300:340, 100:500] = 255
    path = tmp_path / "map.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=700,
        width=600,
        count=1,
        dtype="uint8",
        nodata=255,
        transform=TRANSFORM,
        crs="EPSG:32633",
    ) as dst:
        dst.write(full, 1)
    table = vectorize_class_map(path, ["a", "b", "c"], 255, block_px=128)
    geoms = shapely.from_wkb(table.column("geometry").to_pylist())
    ids = table.column("class_id").to_numpy()
    assert table.column("label").to_pylist()[0] == "a"
    back = rasterio.features.rasterize(
        zip(geoms, ids.tolist(), strict=True), out_shape=full.shape, transform=TRANSFORM, fill=255
    )
    np.testing.assert_array_equal(back, full)
    whole = list(rasterio.features.shapes(full, mask=full != 255, connectivity=4))
    assert len(geoms) == len(whole)  # regions cut by block edges are joined again
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms)
