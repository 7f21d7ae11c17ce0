"""``aoi=``: reading the area, placing it on each raster, and the ``mgpr`` command with it.

The runs are in process on one CPU rank over generated GeoTIFFs (UTM 33N, 10 cm), the area
drawn as a polygon with a hole in raster pixels and saved in EPSG:4326, so every run also
checks the reprojection back onto the raster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from conftest import read_gpkg_layer, run_mgpr_inprocess, segmentation_args, write_array
from pyogrio.raw import write as write_vector
from pyproj import Transformer
from rasterio.features import geometry_mask

from mgpr.errors import ConfigError, InputError
from mgpr.geo.aoi import (
    aoi_in_pixels,
    centres_in_aoi,
    on_aoi,
    read_aoi,
    tile_aoi_mask,
    tiles_in_aoi,
)
from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles

TILE, OVERLAP = 128, 32

#: The area in raster pixels (x = column, y = row): an irregular polygon with a hole, its
#: vertices off the pixel grid so that no pixel centre lies on an edge.
AREA_PX = shapely.Polygon(
    [(40.3, 30.7), (610.2, 60.4), (700.6, 520.3), (300.1, 690.8), (20.4, 400.2)],
    holes=[[(250.3, 250.6), (400.7, 260.2), (380.2, 420.9), (260.9, 400.4)]],
)


def _to_map(info_transform, geom):  # type: ignore[no-untyped-def]
    t = info_transform
    return shapely.affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])


def write_area(
    path: Path, raster: Path, area_px=AREA_PX, crs: str | None = "EPSG:4326", driver="GeoJSON"
):  # type: ignore[no-untyped-def]
    """Save ``area_px`` (raster pixels) as a polygon file in ``crs`` (None: the raster's map
    coordinates, no CRS)."""
    with rasterio.open(raster) as src:
        geom = _to_map(src.transform, shapely.segmentize(area_px, 20.0))
        if crs is not None:
            tr = Transformer.from_crs(src.crs, crs, always_xy=True)
            geom = shapely.transform(
                geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))
            )
    write_vector(
        path,
        np.array([shapely.to_wkb(geom)], dtype=object),
        [],
        fields=[],
        geometry_type="Polygon",
        crs=crs,
        driver=driver,
    )
    return path


@pytest.fixture
def image(make_image):  # type: ignore[no-untyped-def]
    return make_image(
        "ortho.tif", width=768, height=720, objects=30, tile_size=TILE, overlap=OVERLAP, seed=3
    )


# ---------------------------------------------------------------- the area on a raster


def test_area_in_another_crs_lands_on_its_pixels(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    aoi = read_aoi(str(write_area(tmp_path / "area.geojson", image.path)))
    assert aoi.crs_label == "EPSG:4326" and aoi.polygons == 1
    pixel = aoi_in_pixels(describe_raster(str(image.path)), aoi)
    # Reprojected there and back: the same polygon, to well under a pixel.
    assert shapely.symmetric_difference(pixel, AREA_PX).area < 1.0
    assert shapely.hausdorff_distance(pixel, AREA_PX) < 0.01


def test_tiles_kept_share_area_with_it(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    info = describe_raster(str(image.path))
    [info] = on_aoi([info], read_aoi(str(write_area(tmp_path / "a.geojson", image.path))))
    plan = plan_tiles(info.path, info.height, info.width, TILE, OVERLAP)
    kept, outside = tiles_in_aoi(info, TILE, OVERLAP)
    assert outside == len(plan) - len(kept)
    for t in plan:
        box = shapely.box(
            t.col_off, t.row_off, t.col_off + t.valid_width, t.row_off + t.valid_height
        )
        assert (t in kept) == (shapely.intersection(box, AREA_PX).area > 0.01), t
    assert 0 < len(kept) < len(plan)


def test_tile_touching_the_area_only_is_left_out(tmp_path: Path) -> None:
    raster = write_array(tmp_path / "r.tif", np.zeros((3, 256, 256), np.uint8))
    # The area ends exactly on the first tile column's right edge (x = 128 px).
    area = write_area(tmp_path / "a.geojson", raster, shapely.box(0, 0, 128, 256), crs="EPSG:32633")
    [info] = on_aoi([describe_raster(str(raster))], read_aoi(str(area)))
    kept, _ = tiles_in_aoi(info, 128, 0)
    assert [(t.id.row, t.id.col) for t in kept] == [(0, 0), (1, 0)]


def test_centres_and_tile_masks(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    [info] = on_aoi(
        [describe_raster(str(image.path))],
        read_aoi(str(write_area(tmp_path / "a.geojson", image.path))),
    )
    boxes = np.array([[300, 300, 310, 310], [100, 100, 120, 110], [700, 10, 720, 30]], float)
    assert centres_in_aoi(info, boxes).tolist() == [False, True, False]  # hole, inside, outside
    whole = geometry_mask(
        [AREA_PX],
        out_shape=(info.height, info.width),
        transform=rasterio.Affine.identity(),
        invert=True,
    )
    for tile in plan_tiles(info.path, info.height, info.width, TILE, OVERLAP):
        mask = tile_aoi_mask(info, tile)
        rows = slice(tile.row_off, tile.row_off + tile.valid_height)
        cols = slice(tile.col_off, tile.col_off + tile.valid_width)
        expected = whole[rows, cols]
        got = (
            np.ones_like(expected)
            if mask is None
            else mask[: tile.valid_height, : tile.valid_width]
        )
        assert (got != expected).sum() <= 2, tile  # the centre rule, to float noise on edges


def test_same_area_saved_again_is_the_same_area(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = read_aoi(str(write_area(tmp_path / "a.geojson", image.path)))
    b = read_aoi(str(write_area(tmp_path / "b.gpkg", image.path, driver="GPKG")))
    other = read_aoi(str(write_area(tmp_path / "c.geojson", image.path, shapely.box(0, 0, 99, 99))))
    assert a.digest == b.digest != other.digest


def test_area_refusals(image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="does not exist"):
        read_aoi(str(tmp_path / "nope.gpkg"))
    text = tmp_path / "notes.txt"
    text.write_text("a field boundary\n")
    with pytest.raises(InputError, match="not a readable vector file"):
        read_aoi(str(text))
    points = tmp_path / "points.geojson"
    write_vector(
        points,
        np.array([shapely.to_wkb(shapely.Point(15.0, 45.0))], dtype=object),
        [],
        fields=[],
        geometry_type="Point",
        crs="EPSG:4326",
        driver="GeoJSON",
    )
    with pytest.raises(InputError, match="only Point, no polygon"):
        read_aoi(str(points))
    layers = write_area(tmp_path / "two.gpkg", image.path, driver="GPKG")
    write_vector(
        layers,
        np.array([shapely.to_wkb(shapely.box(15, 45, 15.001, 45.001))], dtype=object),
        [],
        fields=[],
        geometry_type="Polygon",
        crs="EPSG:4326",
        driver="GPKG",
        layer="second",
        append=True,
    )
    with pytest.raises(InputError, match="holds 2 layers"):
        read_aoi(str(layers))
    info = describe_raster(str(image.path))
    no_crs = read_aoi(
        str(write_area(tmp_path / "nocrs.geojson", image.path, crs=None, driver="GPKG"))
    )
    with pytest.raises(InputError, match="has no CRS, so it cannot be placed"):
        on_aoi([info], no_crs)
    far = shapely.box(-500, -500, -100, -100)  # pixels left of and above the raster
    with pytest.raises(InputError, match="no input raster overlaps"):
        on_aoi([info], read_aoi(str(write_area(tmp_path / "far.geojson", image.path, far))))


def test_raster_without_crs_takes_an_area_without_one(tmp_path: Path) -> None:
    raster = tmp_path / "plain.tif"
    with rasterio.open(
        raster, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8"
    ) as dst:
        dst.write(np.zeros((3, 100, 200), np.uint8))
    area = write_area(
        tmp_path / "a.gpkg", raster, shapely.box(10, 10, 50, 60), crs=None, driver="GPKG"
    )
    [info] = on_aoi([describe_raster(str(raster))], read_aoi(str(area)))
    assert shapely.equals(shapely.from_wkb(info.aoi_wkb), shapely.box(10, 10, 50, 60))
    other = write_area(tmp_path / "b.geojson", raster, shapely.box(0, 0, 5, 5), crs=None)
    # GeoJSON is WGS 84 by definition: a CRS the raster lacks.
    with pytest.raises(InputError, match="has no CRS, so aoi="):
        on_aoi([describe_raster(str(raster))], read_aoi(str(other)))


def test_aoi_with_fake_data_is_refused(tmp_path: Path) -> None:
    from mgpr.conf.load import load_config

    with pytest.raises(ConfigError, match="use_fake_data=true reads none"):
        load_config([f"aoi={tmp_path / 'a.gpkg'}", "use_fake_data=true"])


# ---------------------------------------------------------------- the command


def _run_args(image: Path, run: Path, *more: str) -> list[str]:
    return [
        f"input_path={image}",
        "model=reference",
        f"tile_size={TILE}",
        f"overlap={OVERLAP}",
        "workers=0",
        "batch_size=4",
        "accelerator=cpu",
        "progress=false",
        f"output_dir={run}",
        *more,
    ]


def test_detections_are_those_centred_in_the_area(image, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    area = write_area(tmp_path / "area.geojson", image.path)
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*_run_args(image.path, run, f"aoi={area}")) == 0
    out = capsys.readouterr().out
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    found = {
        (round((r["px_xmin"] + r["px_xmax"]) / 2, 1), round((r["px_ymin"] + r["px_ymax"]) / 2, 1))
        for r in rows
    }
    inside, near = set(), set()  # near: centre within half a pixel of the outline
    for o in image.objects:
        cx, cy = (o.col_min + o.col_max) / 2, (o.row_min + o.row_max) / 2
        centre = (round(cx, 1), round(cy, 1))
        if AREA_PX.boundary.distance(shapely.Point(cx, cy)) < 0.5:
            near.add(centre)
        elif AREA_PX.contains(shapely.Point(cx, cy)):
            inside.add(centre)
    assert 5 <= len(inside) < len(image.objects) - 5 and len(near) <= 2
    assert found - near == inside  # each object centred in the area found once, none outside
    summary = json.loads((run / "summary.json").read_text())
    info = describe_raster(str(image.path))
    plan = plan_tiles(info.path, info.height, info.width, TILE, OVERLAP)
    assert summary["tiles_total"] + summary["aoi"]["tiles_outside"] == len(plan)
    assert summary["aoi"]["tiles_outside"] > 0 and summary["aoi"]["crs"] == "EPSG:4326"
    assert f"aoi          {area} (EPSG:4326): {summary['tiles_total']} tiles touch it" in out
    # Resume: the same area saved again is the same run; another area is another run.
    again = write_area(tmp_path / "same.gpkg", image.path, driver="GPKG")
    assert run_mgpr_inprocess(*_run_args(image.path, run, f"aoi={again}")) == 0
    assert "by earlier runs" in capsys.readouterr().out
    other = write_area(tmp_path / "other.geojson", image.path, shapely.box(0, 0, 300, 300))
    assert run_mgpr_inprocess(*_run_args(image.path, run, f"aoi={other}")) == 2
    assert "aoi= is another area of interest than the run's" in capsys.readouterr().err


def test_inputs_outside_the_area_are_left_out(make_image, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "tiles"
    folder.mkdir()
    a = make_image("tiles/a.tif", width=256, height=256, objects=0, seed=1)
    make_image("tiles/b.tif", width=256, height=256, objects=0, seed=2, origin_x=600000.0)
    area = write_area(tmp_path / "area.geojson", a.path, shapely.box(10.5, 10.5, 200.5, 200.5))
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*_run_args(folder, run, f"aoi={area}")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["aoi"]["inputs_outside"] == [str(folder / "b.tif")]
    assert [i["path"] for i in summary["provenance"]["inputs"]] == [str(a.path)]
    assert "1 input(s) outside left out" in capsys.readouterr().out


@pytest.mark.parametrize("seam", ["crop", "blend"])
def test_class_map_is_nodata_outside_the_area(image, tmp_path: Path, seam: str) -> None:  # type: ignore[no-untyped-def]
    area = write_area(tmp_path / "area.geojson", image.path)
    run = tmp_path / "run"
    args = segmentation_args(image.path, run, f"aoi={area}", f"seam={seam}", "probabilities=true")
    assert run_mgpr_inprocess(*args) == 0
    with rasterio.open(run / "segmentation" / "ortho.tif") as src:
        ids = src.read(1)
        written = ids != src.nodata
    with rasterio.open(run / "segmentation" / "ortho_prob.tif") as src:
        probs = src.read()
    inside = geometry_mask(
        [AREA_PX], out_shape=ids.shape, transform=rasterio.Affine.identity(), invert=True
    )
    assert (written != inside).sum() <= 10  # the centre rule, to float noise on the outline
    assert inside.sum() > 100_000 and (probs[:, ~inside] == 0).all()
    summary = json.loads((run / "summary.json").read_text())
    classified = sum(c["pixels"] for c in summary["classes"].values())
    assert classified == written.sum()  # exact; records also counts the nodata written
    assert classified < summary["records"] < ids.size  # tiles wholly outside: none written
