"""Instance segmentation (Mask R-CNN style: a box and a mask per object) -> object outlines.

A planted-disc raster is the truth: every disc's pixels are known, so each written outline can
be checked against its disc exactly (area, shape), whether the disc lies inside a tile, across
a seam, or at the raster's edge.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import torch
from conftest import run_mgpr_inprocess, segmentation_args, write_utm_rgb

from mgpr.errors import ModelError
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import Detections, InstanceMask, instance_masks
from mgpr.models.custom import ModuleAdapter
from mgpr.models.tta import VIEWS
from mgpr.tasks.detection import mask_outline

BLOBS = """
import numpy as np
import torch
from scipy import ndimage


class Blobs(torch.nn.Module):
    \"\"\"Each bright blob: its box, a mask of its pixels (float, pasted on the tile), and a
    score that depends on where it lies (so another view than the tile itself may win).\"\"\"

    task = "detection"
    categories = ["disc"]

    def forward(self, x):
        out = []
        for tile in x:
            bright = (tile.mean(dim=0) > 0.7).cpu().numpy()
            labels, n = ndimage.label(bright)
            boxes, scores, masks = [], [], []
            for i, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
                boxes.append([cols.start, rows.start, cols.stop, rows.stop])
                cx, cy = (cols.start + cols.stop) / 2, (rows.start + rows.stop) / 2
                scores.append(0.3 + 0.6 * (cx + 2 * cy) / (3 * tile.shape[-1]))
                masks.append((labels == i).astype(np.float32) * 0.9)
            h, w = bright.shape
            out.append({
                "boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.ones(len(scores), dtype=torch.int64),
                "masks": torch.tensor(np.asarray(masks, np.float32).reshape(-1, 1, h, w)),
            })
        return out


def build(weights):
    return Blobs()


class Cropped(Blobs):
    def forward(self, x):
        out = super().forward(x)
        for det in out:
            det["masks"] = det["masks"][:, :, :8, :8]
        return out


def cropped(weights):
    return Cropped()


class Bright(torch.nn.Module):
    \"\"\"A segmenter of the same discs: class 1 where the tile is bright.\"\"\"

    task = "segmentation"
    categories = ["background", "disc"]

    def forward(self, x):
        disc = (x.mean(dim=1, keepdim=True) > 0.7).float()
        return torch.cat([1 - disc, disc], dim=1) * 10


def bright(weights):
    return Bright()
"""

#: Disc centres (row, col) and radii, in pixels of the 160 x 224 raster (tiles of 64, overlap
#: 24 > every disc's diameter: stride 40): in a tile, across seams and corners, at the edge.
DISCS = [(20, 20, 9), (30, 96, 10), (96, 30, 8), (100, 100, 11), (150, 214, 7), (60, 160, 6)]


@pytest.fixture
def blobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "mgpr_blobs.py").write_text(textwrap.dedent(BLOBS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import mgpr_blobs

    return importlib.reload(mgpr_blobs)


def _disc_raster(path: Path, shape: tuple[int, int] = (160, 224)) -> tuple[Path, list[np.ndarray]]:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    data = np.random.default_rng(0).integers(0, 90, (3, *shape), dtype=np.uint8)
    truth = []
    for r, c, radius in DISCS:
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
        data[:, disc] = 230
        truth.append(disc)
    write_utm_rgb(path, data, 0.5)
    return path, truth


def _outlines(run: Path) -> list[shapely.Geometry]:
    table = pq.read_table(run / "detections.parquet")
    return list(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))


def _disc_polygon(disc: np.ndarray) -> shapely.Geometry:
    """The disc's pixels as a polygon in map coordinates (0.5 m pixels from 500000, 5000000)."""
    rows, cols = np.nonzero(disc)
    squares = shapely.box(
        500000 + cols * 0.5,
        5000000 - (rows + 1) * 0.5,
        500000 + (cols + 1) * 0.5,
        5000000 - rows * 0.5,
    )
    return shapely.union_all(squares)


# ---------------------------------------------------------------- masks on a tile


def test_masks_become_crops_of_the_objects_pixels() -> None:
    masks = torch.zeros(3, 1, 16, 20)
    masks[0, 0, 2:6, 3:11] = 0.9
    masks[0, 0, 7, 12] = 0.4  # below 0.5: not the object's
    masks[1, 0, 15, 19] = 0.6
    crops = instance_masks(masks)
    assert [(c.row, c.col, c.mask.shape) for c in crops] == [
        (2, 3, (4, 8)),
        (15, 19, (1, 1)),
        (0, 0, (0, 0)),
    ]
    assert crops[0].mask.all()
    assert instance_masks(torch.zeros(2, 8, 8, dtype=torch.uint8))[0].mask.shape == (0, 0)


def test_an_outline_is_the_masks_pixels_in_raster_pixels(make_image) -> None:
    tile = plan_tiles("r.tif", 100, 90, 64, 16)[-1]  # an edge tile: 64 px of which 42 x 52 inside
    assert (tile.valid_height, tile.valid_width) == (52, 42)
    pixels = np.zeros((10, 30), bool)
    pixels[2:8, 0:30] = True
    pixels[4, 5] = False  # a hole
    outline = shapely.from_wkb(mask_outline(InstanceMask(40, 20, pixels), tile))
    # the 8 columns past the raster's edge (col 20 + 22 = 42) are left out
    assert outline.area == 6 * 22 - 1
    assert outline.bounds == (
        tile.col_off + 20,
        tile.row_off + 42,
        tile.col_off + 42,
        tile.row_off + 48,
    )
    assert mask_outline(InstanceMask(0, 0, np.zeros((3, 3), bool)), tile) is None


def test_a_mask_seen_in_any_view_comes_back_to_the_tile() -> None:
    size = 24
    tile = np.zeros((size, size), bool)
    tile[3:9, 11:20] = True
    tile[5, 12] = False  # no symmetry of its own
    want = tile[3:9, 11:20]
    for view in VIEWS["d4"]:
        seen = view.apply(torch.from_numpy(tile)).numpy()
        rows, cols = np.nonzero(seen)
        r0, c0 = rows.min(), cols.min()
        crop = InstanceMask(int(r0), int(c0), seen[r0 : rows.max() + 1, c0 : cols.max() + 1])
        back = view.undo_mask(crop, size)
        assert (back.row, back.col) == (3, 11)
        np.testing.assert_array_equal(back.mask, want)


def test_masks_follow_their_boxes_and_a_wrong_size_is_refused(blobs) -> None:
    det = Detections(
        boxes=np.array([[0, 0, 2, 2], [3, 3, 5, 5]], np.float32),
        scores=np.array([0.2, 0.9], np.float32),
        labels=np.array([1, 1], np.int64),
        masks=(
            InstanceMask(0, 0, np.ones((2, 2), bool)),
            InstanceMask(3, 3, np.ones((2, 2), bool)),
        ),
    )
    assert det.best(1).masks == (det.masks[1],)
    with pytest.raises(ValueError, match="one mask per box"):
        Detections(det.boxes, det.scores, det.labels, masks=det.masks[:1])
    adapter = ModuleAdapter(
        blobs.cropped("w"), name="u:m", weights="w", topk=5, score_threshold=0.05, tile_size=32
    )
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 4:9, 4:9] = 1.0
    with pytest.raises(
        ModelError, match=r"masks of shape \(1, 1, 8, 8\).*\(1, 1, 32, 32\) mask per box"
    ):
        adapter.postprocess(adapter.forward(x), 32)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize(("tta", "fusion"), [("none", "nms"), ("d4", "nms"), ("d4", "wbf")])
def test_every_disc_is_outlined_once_whole_across_seams(
    blobs, tmp_path: Path, tta: str, fusion: str
) -> None:
    """Each planted disc is one feature whose outline is the disc's pixels exactly (area and
    shape), inside a tile, across seams and at the edge; with tta=d4 the best view is often a
    turned one (scores depend on position), and its mask is turned back exactly."""
    image, truth = _disc_raster(tmp_path / "discs.tif")
    run = tmp_path / "run"
    args = segmentation_args(
        image, run, "output_format=both", model="mgpr_blobs:build", tile_size=64, overlap=24
    )
    assert run_mgpr_inprocess(*args, f"tta={tta}", f"tta_fusion={fusion}") == 0
    outlines = _outlines(run)
    assert len(outlines) == len(DISCS)
    for disc in truth:
        want = _disc_polygon(disc)
        match = [g for g in outlines if g.intersects(want.centroid)]
        assert len(match) == 1
        assert match[0].area == pytest.approx(disc.sum() * 0.25)
        assert match[0].symmetric_difference(want).area < 1e-6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["records"] == len(DISCS) and summary["duplicates_removed"] >= 3
    table = pq.read_table(run / "detections.parquet")
    np.testing.assert_allclose(
        sorted(table["area_m2"].to_pylist()), sorted(d.sum() * 0.25 for d in truth), rtol=2e-3
    )
    import sqlite3

    with sqlite3.connect(run / "predictions.gpkg") as db:
        assert db.execute("SELECT count(*) FROM detections").fetchone() == (len(DISCS),)


def test_maskrcnn_returns_a_mask_crop_per_box_and_loads_a_fine_tuned_checkpoint(
    tmp_path: Path,
) -> None:
    """The built-in Mask R-CNN (random weights, every box kept) gives each box a crop of its
    mask inside the tile, under bf16 autocast too; a 2-class fine-tune (tree crowns) loads."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from mgpr.models.detection import build_maskrcnn

    adapter = build_maskrcnn("none", score_threshold=0.0, tile_size=128, max_detections=20)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = adapter.postprocess(adapter.forward(adapter.prepare(x)), 128)
    assert any(len(d) for d in dets)
    for d in dets:
        assert d.masks is not None and len(d.masks) == len(d)
        for m in d.masks:
            assert m.row + m.mask.shape[0] <= 128 and m.col + m.mask.shape[1] <= 128
    torch.manual_seed(0)
    tuned = tmp_path / "crowns.pth"
    torch.save(
        maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).state_dict(),
        tuned,
    )
    assert build_maskrcnn(str(tuned)).categories == ("0", "1")


def test_shared_tracing_gives_each_objects_own_outline() -> None:
    """Many objects, overlapping each other and past the raster's edge: traced in shared label
    images, each object's outline is the one traced from its crop alone."""
    from mgpr.tasks.detection import SHARED_TRACE_OBJECTS, tile_outlines

    tile = plan_tiles("r.tif", 200, 180, 128, 32)[-1]  # an edge tile, partly outside
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[:128, :128]
    crops = []
    for _ in range(3 * SHARED_TRACE_OBJECTS):
        r, c, radius = *rng.uniform(0, 128, 2), rng.uniform(3, 25)
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
        disc[rng.random(disc.shape) < 0.05] = False  # specks and holes
        rr, cc = np.nonzero(disc)
        if not len(rr):
            continue
        window = disc[rr.min() : rr.max() + 1, cc.min() : cc.max() + 1]
        crops.append(InstanceMask(int(rr.min()), int(cc.min()), window))
    crops.append(InstanceMask(200, 200, np.ones((3, 3), bool)))  # wholly past the edge
    shared = tile_outlines(crops, tile)
    alone = [mask_outline(c, tile) for c in crops]
    assert shared[-1] is None and alone[-1] is None
    assert [a is None for a in shared] == [b is None for b in alone]
    assert sum(a is not None for a in shared) > SHARED_TRACE_OBJECTS
    for a, b in zip(shared, alone, strict=True):
        if a is not None:
            ga, gb = shapely.from_wkb(a), shapely.from_wkb(b)
            assert ga.area == gb.area and ga.symmetric_difference(gb).area == 0


@pytest.mark.slow
def test_simplify_smooths_outlines_and_keeps_segments_a_coverage(blobs, tmp_path: Path) -> None:
    """simplify=1 (pixel): object outlines and segments lose their pixel staircase (far fewer
    vertices) but keep their area to a few percent; segments stay one coverage (no gaps, no
    overlaps: their areas add up to the raster's)."""
    image, truth = _disc_raster(tmp_path / "discs.tif")

    def run(name: str, model: str, *more: str) -> list[shapely.Geometry]:
        out = tmp_path / name
        args = segmentation_args(image, out, "output_format=parquet", *more, model=model)
        assert run_mgpr_inprocess(*args, "tile_size=64", "overlap=24") == 0
        layer = "detections" if "blobs:build" in model else "segments"
        table = pq.read_table(out / f"{layer}.parquet")
        return list(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))

    exact = run("exact", "mgpr_blobs:build")
    smooth = run("smooth", "mgpr_blobs:build", "simplify=1")
    assert len(smooth) == len(exact) == len(DISCS)
    assert sum(shapely.get_num_coordinates(smooth)) < 0.5 * sum(shapely.get_num_coordinates(exact))
    for a in smooth:
        (b,) = [g for g in exact if g.intersects(a.centroid)]
        # Douglas-Peucker keeps a staircase's outer corners: a little larger, same place
        assert a.is_valid and abs(a.area - b.area) < 0.12 * b.area
        assert a.intersection(b).area / a.union(b).area > 0.85
    areas = [
        pq.read_table(tmp_path / n / "detections.parquet")["area_m2"] for n in ("exact", "smooth")
    ]
    assert sorted(areas[0].to_pylist()) == sorted(areas[1].to_pylist())  # the masks' own

    segments = run("seg", "mgpr_blobs:bright", "vectorize=true")
    simple = run("seg1", "mgpr_blobs:bright", "vectorize=true", "simplify=1")
    assert sum(shapely.get_num_coordinates(simple)) < 0.5 * sum(
        shapely.get_num_coordinates(segments)
    )
    raster_area = 160 * 224 * 0.25
    assert sum(g.area for g in segments) == pytest.approx(raster_area)
    assert sum(g.area for g in simple) == pytest.approx(raster_area, rel=1e-9)
    assert shapely.union_all(simple).area == pytest.approx(raster_area, rel=1e-9)
    with pytest.raises(Exception, match="simplify=-1.0 is out of range"):
        from mgpr.conf.load import load_config

        load_config(["simplify=-1"])
