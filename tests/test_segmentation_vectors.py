"""Segmentation outputs beyond the uint8 class map: vectorize=true layers, > 255 classes.

``vectorize=true`` polygons go through the run's vector writers (predictions.gpkg and/or
segments.parquet, layer rules of mgpr.tasks.layers); rasterised back they must equal the class
map COG. A custom 300-class segmenter gives a uint16 class map with nodata 65535.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.features
import shapely
from conftest import run_mgpr_inprocess, segmentation_args
from geoparquet_helpers import read_geoparquet


def _burn(geoms, values, cog: Path, nodata: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The polygons rasterised on the class map's grid, and the class map itself."""
    with rasterio.open(cog) as src:
        ids, transform = src.read(1), src.transform
    burnt = rasterio.features.rasterize(
        zip(geoms, values, strict=True),
        out_shape=ids.shape,
        transform=transform,
        fill=nodata,
        dtype=dtype,
    )
    return burnt, ids


def _gpkg(path: Path, layer: str) -> tuple[list[shapely.Geometry], dict[str, list], str]:
    meta, _fids, wkb, data = pyogrio.raw.read(path, layer=layer)
    columns = {name: data[i].tolist() for i, name in enumerate(meta["fields"])}
    return list(shapely.from_wkb(wkb)), columns, meta["crs"]


@pytest.mark.slow
def test_polygons_equal_the_class_map_regions_in_gpkg_and_parquet(
    make_image, tmp_path: Path, capsys
) -> None:
    img = make_image(width=600, height=450, objects=10, nodata="border")
    run = tmp_path / "run"
    args = segmentation_args(img.path, run, "vectorize=true", "output_format=both")
    assert run_mgpr_inprocess(*args) == 0
    summary = json.loads((run / "summary.json").read_text())
    out_lines = capsys.readouterr().out.splitlines()
    (output_line,) = [ln for ln in out_lines if "  output  " in ln]
    classified = sum(c["pixels"] for c in summary["classes"].values())  # a nodata border
    nodata, segments = summary["records"] - classified, summary["layers"]["segments"]
    assert output_line.endswith(
        f"({summary['records']} class-map pixels, {classified} classified, {nodata} nodata; "
        f"layer segments: {segments})"
    )
    cog = run / "segmentation" / "ortho.tif"
    assert not list((run / "segmentation").glob("*_polygons*"))  # the old side file is gone
    with rasterio.open(cog) as src:
        pixel_area = abs(src.transform.a * src.transform.e)
    gp_geoms, gp_cols, gp_crs = _gpkg(run / "predictions.gpkg", "segments")
    pq_geoms, table, crs, _geo = read_geoparquet(run / "segments.parquet")
    assert list(gp_cols) == ["class_id", "label", "source", "area", "area_m2"]
    assert table.column_names == ["class_id", "label", "source", "area", "area_m2"]
    assert gp_crs == "EPSG:32633" and crs is not None and crs.to_epsg() == 32633
    for geoms, class_ids in ((gp_geoms, gp_cols["class_id"]), (pq_geoms, table["class_id"])):
        burnt, ids = _burn(geoms, list(class_ids), cog, 255, "uint8")
        assert np.array_equal(burnt, ids)
    assert all(shapely.equals(a, b) for a, b in zip(gp_geoms, pq_geoms, strict=True))
    assert set(gp_cols["label"]) == {"background", "bright"}
    assert set(gp_cols["source"]) == {str(img.path)}
    np.testing.assert_allclose(gp_cols["area"], [g.area for g in gp_geoms])
    _burnt, ids = _burn([], [], cog, 255, "uint8")
    assert sum(gp_cols["area"]) == pytest.approx((ids != 255).sum() * pixel_area)
    # On the ground: UTM 33N's scale near its central meridian is 0.9996, a planar m^2 is
    # 1 / 0.9996^2 ground m^2 (0.08 % more).
    np.testing.assert_allclose(
        gp_cols["area_m2"], np.asarray(gp_cols["area"]) / 0.9996**2, rtol=2e-4
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layers"]["segments"] == len(gp_geoms) > 10
    # Per class: the map's pixels, their ground area (counted tile by tile: the polygons'
    # geodesic areas to 1e-6) and the layer's polygons, largest area first
    names = ["background", "bright"]
    hist = np.bincount(ids[ids != 255], minlength=2)
    assert list(summary["classes"]) == sorted(names, key=lambda n: -hist[names.index(n)])
    for name, entry in summary["classes"].items():
        mine = [i for i, lab in enumerate(gp_cols["label"]) if lab == name]
        assert entry["polygons"] == len(mine)
        assert entry["pixels"] == hist[names.index(name)]
        want = sum(gp_cols["area_m2"][i] for i in mine)
        assert entry["area_m2"] == pytest.approx(want, rel=1e-6)
    shown = [ln for ln in out_lines if ln.startswith("  classes")]
    assert shown and shown[0].startswith("  classes      by ground area: background ")
    assert str(run / "predictions.gpkg") in summary["outputs"]
    assert str(run / "segments.parquet") in summary["outputs"]
    assert str(cog) in summary["outputs"]


@pytest.mark.slow
def test_two_crss_give_two_layers(make_image, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    make_image("in/a.tif", width=384, height=256, objects=4, crs="EPSG:32633")
    make_image("in/b.tif", width=256, height=384, objects=4, crs="EPSG:32632", seed=7)
    run = tmp_path / "run"
    assert (
        run_mgpr_inprocess(*segmentation_args(folder, run, "vectorize=true", "output_format=both"))
        == 0
    )
    layers = sorted(name for name, _ in pyogrio.list_layers(run / "predictions.gpkg"))
    assert layers == ["segments_epsg32632", "segments_epsg32633"]
    assert sorted(p.name for p in run.glob("*.parquet")) == [f"{n}.parquet" for n in layers]
    summary = json.loads((run / "summary.json").read_text())
    cases = (("segments_epsg32633", "a", 32633), ("segments_epsg32632", "b", 32632))
    for layer, stem, epsg in cases:
        geoms, cols, gp_crs = _gpkg(run / "predictions.gpkg", layer)
        assert gp_crs == f"EPSG:{epsg}" and set(cols["source"]) == {str(folder / f"{stem}.tif")}
        cog = run / "segmentation" / f"{stem}.tif"
        burnt, ids = _burn(geoms, cols["class_id"], cog, 255, "uint8")
        assert np.array_equal(burnt, ids)
        pq_geoms, _table, crs, _geo = read_geoparquet(run / f"{layer}.parquet")
        assert crs is not None and crs.to_epsg() == epsg and len(pq_geoms) == len(geoms)
        assert summary["layers"][layer] == len(geoms)


MANY = '''
import torch

K = 300


class Many(torch.nn.Module):
    """300 classes: 299 where every band is bright (>= 245 of 255), else band 1's value."""

    task = "segmentation"
    categories = tuple(f"c{i}" for i in range(K))

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        v = torch.round(x * 255)
        ids = torch.where((v >= 245).all(dim=1), K - 1, v[:, 0].long().clamp(0, 254))
        return torch.nn.functional.one_hot(ids, K).permute(0, 3, 1, 2).float()


def build(weights):
    return Many()
'''


@pytest.mark.slow
def test_300_classes_give_a_uint16_class_map(
    make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mgpr_many.py").write_text(textwrap.dedent(MANY))
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image(width=384, height=320, objects=6, nodata="border")
    run = tmp_path / "run"
    args = segmentation_args(img.path, run, "batch_size=2", model="mgpr_many:build")
    assert run_mgpr_inprocess(*args) == 0
    with rasterio.open(img.path) as src:
        data = src.read()
        invalid = src.dataset_mask() == 0
    band1 = np.minimum(data[0], 254).astype(np.uint16)
    want = np.where((data >= 245).all(axis=0), np.uint16(299), band1)
    want[invalid] = 65535
    cog = run / "segmentation" / "ortho.tif"
    with rasterio.open(cog) as out:
        assert out.dtypes[0] == "uint16" and out.nodata == 65535
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        ids = out.read(1)
        colours = out.colormap(1)
        names = json.loads(out.tags()["class_names"])
        assert out.descriptions == ("class",)
    assert np.array_equal(ids, want)
    assert (ids == 299).sum() > 50 and ((ids > 255) & (ids != 65535)).any()
    assert names == [f"c{i}" for i in range(300)]
    # The colour table reaches past 255 (GDAL keeps colour tables for UInt16) and the colours
    # are those of the class ids: class 0 grey, 299 its own hue.
    from mgpr.outputs.cog import class_colours

    assert len(colours) >= 300 and colours[299] == class_colours(300)[299]
    assert colours[0] == (128, 128, 128, 255)


def test_uint16_class_map_polygons_keep_ids_above_255(tmp_path: Path) -> None:
    from affine import Affine

    from mgpr.tasks.vectorize import class_map_features

    ids = np.full((300, 260), 65535, np.uint16)  # nodata border
    ids[10:290, 10:250] = 7
    ids[40:200, 30:120] = 299
    ids[100:120, 60:80] = 7  # a hole in 299, an island of 7
    path = tmp_path / "ids.tif"
    transform = Affine(0.5, 0, 500_000, 0, -0.5, 5_800_000)
    profile = {"driver": "GTiff", "height": 300, "width": 260, "count": 1, "dtype": "uint16"}
    with rasterio.open(
        path, "w", **profile, nodata=65535, crs="EPSG:32633", transform=transform
    ) as d:
        d.write(ids, 1)
    names = [f"c{i}" for i in range(300)]
    wkt = rasterio.crs.CRS.from_epsg(32633).to_wkt()
    batch = class_map_features(path, names, 65535, "in.tif", crs_wkt=wkt, block_px=128)
    assert batch.fields["class_id"].tolist() == [7, 7, 299]
    assert batch.fields["label"].tolist() == ["c7", "c7", "c299"]
    big = batch.shapes()[2]
    assert len(big.interiors) == 1 and big.area == pytest.approx((160 * 90 - 400) * 0.25)
    burnt, back = _burn(batch.shapes(), batch.fields["class_id"].tolist(), path, 65535, "uint16")
    assert np.array_equal(burnt, back)


@pytest.mark.slow
def test_ranks_trace_their_own_rasters_and_rank0_writes_the_same_layers(
    make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finalise on 2 'ranks' publishes each raster's polygons; the gather equals 1 rank's."""
    from mgpr.geo.raster import describe_raster
    from mgpr.geo.tiling import plan_tiles
    from mgpr.outputs.features import feature_path
    from mgpr.tasks import get_task
    from mgpr.tasks.base import TaskContext
    from mgpr.tasks.merge import finalise_share, merge_run

    folder = tmp_path / "in"
    folder.mkdir()
    make_image("in/a.tif", width=384, height=256, objects=4, crs="EPSG:32633")
    make_image("in/b.tif", width=256, height=256, objects=4, crs="EPSG:32632", seed=3)
    make_image("in/c.tif", width=256, height=384, objects=4, crs="EPSG:32633", seed=5)
    run = tmp_path / "run"
    assert (
        run_mgpr_inprocess(
            *segmentation_args(folder, run, "vectorize=true", "output_format=parquet")
        )
        == 0
    )
    want = {p.name: p.read_bytes() for p in run.glob("segments_*.parquet")}
    assert sorted(want) == ["segments_epsg32632.parquet", "segments_epsg32633.parquet"]
    infos = [describe_raster(str(folder / n)) for n in ("a.tif", "b.tif", "c.tif")]
    tiles = [t for i in infos for t in plan_tiles(i.path, i.height, i.width, 128, 32)]
    ctx = TaskContext({i.path: i for i in infos}, 128, 32, ("background", "bright"), vectorize=True)
    task = get_task("segmentation")
    for path in want:
        (run / path).unlink()
    share, _ = finalise_share(run, task, ctx, tiles, 1, 2)  # "rank 0" never publishes its share
    assert share == [str(folder / "c.tif")]  # a, c: 6 tiles each; b: 4 (largest first)
    assert [feature_path(run, i).exists() for i in range(3)] == [False, False, True]
    import mgpr.tasks.segmentation_polygons as polygons

    traced: list[str] = []

    def tracing(class_map, names, nodata, source, **kw):
        traced.append(source)
        return features(class_map, names, nodata, source, **kw)

    features = polygons.class_map_features
    monkeypatch.setattr(polygons, "class_map_features", tracing)
    spread = merge_run(run, task, ctx, tiles, output_format="parquet", use_finalised=True)
    assert sorted(traced) == [str(folder / "a.tif"), str(folder / "b.tif")]  # c: its file
    assert {p.name: p.read_bytes() for p in run.glob("segments_*.parquet")} == want
    assert sum(spread.layers.values()) > 10 and not (run / "merge").exists()


@pytest.mark.parametrize("flip", ["south-up", "east-left"])
def test_segments_of_a_flipped_raster_are_counter_clockwise_in_both_formats(
    make_image, tmp_path: Path, flip: str
) -> None:
    """A transform that flips an axis traces rings the other way round on the map: the
    GeoPackage held clockwise exteriors for them while GeoParquet (oriented) did not."""
    from affine import Affine
    from conftest import read_gpkg_layer

    img = make_image(width=300, height=260, objects=5, nodata="border")
    with rasterio.open(img.path) as src:
        profile, t, data = src.profile, src.transform, src.read()
    h, w = data.shape[1:]
    if flip == "south-up":
        profile["transform"] = Affine(t.a, 0, t.c, 0, -t.e, t.f + h * t.e)
        data = data[:, ::-1]
    else:
        profile["transform"] = Affine(-t.a, 0, t.c + w * t.a, 0, t.e, t.f)
        data = data[:, :, ::-1]
    flipped = tmp_path / "flipped.tif"
    with rasterio.open(flipped, "w", **profile) as dst:
        dst.write(np.ascontiguousarray(data))
    run = tmp_path / "run"
    args = segmentation_args(flipped, run, "vectorize=true", "output_format=both")
    assert run_mgpr_inprocess(*args) == 0
    gpkg, _, _ = read_gpkg_layer(run / "predictions.gpkg", "segments")
    parquet, _table, _crs, _geo = read_geoparquet(run / "segments.parquet")
    for geoms in (gpkg, parquet):
        assert geoms and all(shapely.is_ccw(g.exterior) for g in geoms)
        assert all(not shapely.is_ccw(r) for g in geoms for r in g.interiors)
    assert [g.wkb for g in gpkg] == [g.wkb for g in parquet]  # the same features
