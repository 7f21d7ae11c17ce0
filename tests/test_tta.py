"""Test-time augmentation (``tta=flips|d4``): the views are the square's symmetries.

And the averaged model is equivariant under them whatever the network.

The checks do not re-implement the averaging: a network that is NOT equivariant (a seeded
random convolution plus a ramp of tile-local position) becomes exactly equivariant once
averaged over a group, and only if every view's output is turned back the right way; a view
turned back wrongly (a quarter turn the other way, a mirror after instead of before the turn)
breaks it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_mgpr_inprocess, segmentation_args, write_utm_rgb

from mgpr.conf.load import normalise_tta
from mgpr.errors import ConfigError
from mgpr.models.custom import ModuleAdapter
from mgpr.models.tta import VIEWS, augmented_forward, class_probabilities

NOT_EQUIVARIANT = """
import torch


class Skewed(torch.nn.Module):
    \"\"\"A seeded 3x3 convolution plus a ramp of tile-local position: no symmetry at all.\"\"\"

    def __init__(self, k, task):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, k, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 2)
            self.conv.bias.copy_(torch.randn(k, generator=g) * 0.1)
        self.task = task
        self.categories = [f"c{i}" for i in range(max(k, 2))]

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w) * torch.linspace(0, 2, h).view(1, 1, h, 1)
        y = self.conv((x - 0.5) * 4) + ramp * torch.arange(self.conv.out_channels).view(1, -1, 1, 1)
        if self.task == "classification":
            weights = torch.linspace(0, 1, h * w).view(1, 1, h, w)  # position-weighted pooling
            return (y * weights).mean(dim=(2, 3))
        return y


def seg(weights):
    return Skewed(3, "segmentation")


def binary(weights):
    return Skewed(1, "segmentation")


def cls(weights):
    return Skewed(4, "classification")


class SkewedBoxes(torch.nn.Module):
    # Boxes of bright blobs, each shifted 1 px right and scored by where it lies: a detector
    # with no symmetry (its boxes and scores change with the tile's orientation).

    task = "detection"
    categories = ["blob"]

    def forward(self, x):
        import numpy as np
        from scipy import ndimage

        out = []
        for tile in x:
            mask = (tile.mean(dim=0) > 0.9).cpu().numpy()
            labels, _n = ndimage.label(mask)
            boxes, scores = [], []
            for rows, cols in ndimage.find_objects(labels):
                boxes.append([cols.start + 1, rows.start, cols.stop + 1, rows.stop])
                cx, cy = (cols.start + cols.stop) / 2, (rows.start + rows.stop) / 2
                scores.append(0.2 + 0.6 * (cx + 2 * cy) / (3 * tile.shape[-1]))
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            out.append({"boxes": torch.from_numpy(boxes), "scores": torch.tensor(scores),
                        "labels": torch.ones(len(scores), dtype=torch.int64)})
        return out


def det(weights):
    return SkewedBoxes()


class ShiftedBoxes(SkewedBoxes):
    # Every blob's box 1 px right of it in the view it sees, all scored 0.9: a box bias that
    # the flips average out (two views see the tile mirrored left-right) and NMS keeps.

    def forward(self, x):
        out = super().forward(x)
        for det in out:
            det["scores"] = torch.full_like(det["scores"], 0.9)
        return out


def shifted(weights):
    return ShiftedBoxes()
"""


@pytest.fixture
def skewed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "mgpr_tta_models.py").write_text(textwrap.dedent(NOT_EQUIVARIANT))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import mgpr_tta_models

    return importlib.reload(mgpr_tta_models)


def _adapter(module: torch.nn.Module, tile: int) -> ModuleAdapter:
    return ModuleAdapter(
        module, name="user:skewed", weights="w", topk=2, score_threshold=0.05, tile_size=tile
    )


def test_views_are_the_symmetries_of_the_square() -> None:
    x = torch.arange(25.0).view(1, 1, 5, 5)
    a = x[0, 0].numpy()
    group = {
        "flips": [a, np.fliplr(a), np.flipud(a), np.rot90(a, 2)],
        "d4": [np.rot90(b, k) for k in range(4) for b in (a, np.fliplr(a))],
    }
    for mode, want in group.items():
        got = [v.apply(x)[0, 0].numpy() for v in VIEWS[mode]]
        assert len(got) == len(want) == len({g.tobytes() for g in got})  # all distinct
        assert {g.tobytes() for g in got} == {np.ascontiguousarray(w).tobytes() for w in want}
        for view in VIEWS[mode]:
            assert torch.equal(view.undo(view.apply(x)), x)
    assert len(VIEWS["none"]) == 1 and torch.equal(VIEWS["none"][0].apply(x), x)
    from mgpr.conf.load import TTA_MODES

    assert set(VIEWS) == set(TTA_MODES)  # the key's values (torch-free config) have views


def _mean_probabilities(adapter: ModuleAdapter, x: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.inference_mode():
        return augmented_forward(adapter, x, VIEWS[mode]).exp()  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["seg", "binary"])
def test_an_averaged_segmenter_is_equivariant_under_its_views(skewed, name: str) -> None:
    adapter = _adapter(getattr(skewed, name)("w"), tile=16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = _mean_probabilities(adapter, x, "none")
    turned = _mean_probabilities(adapter, VIEWS["d4"][2].apply(x), "none")
    assert not torch.allclose(VIEWS["d4"][2].apply(plain), turned, atol=1e-3)  # no symmetry
    for mode in ("flips", "d4"):
        mean = _mean_probabilities(adapter, x, mode)
        assert torch.allclose(mean.sum(dim=1), torch.ones(2, 16, 16), atol=1e-5)
        for view in VIEWS[mode]:
            got = _mean_probabilities(adapter, view.apply(x), mode)
            torch.testing.assert_close(got, view.apply(mean), atol=1e-5, rtol=1e-5)
    # d4 is not flips: a quarter turn is no symmetry of the flips average
    flips = _mean_probabilities(adapter, x, "flips")
    quarter = VIEWS["d4"][2]
    turned = _mean_probabilities(adapter, quarter.apply(x), "flips")
    assert not torch.allclose(turned, quarter.apply(flips), atol=1e-3)


def test_a_binary_logit_is_averaged_as_its_sigmoid(skewed) -> None:
    module = skewed.binary("w")
    adapter = _adapter(module, tile=8)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    mean = _mean_probabilities(adapter, x, "flips")
    with torch.inference_mode():
        p = [v.undo(torch.sigmoid(module(v.apply(x)))) for v in VIEWS["flips"]]
    want = torch.stack(p).mean(dim=0)
    torch.testing.assert_close(mean[:, 1:], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(class_probabilities(torch.zeros(1, 1, 2, 2))[0, :, 0, 0],
                               torch.tensor([0.5, 0.5]))  # fmt: skip


def test_an_averaged_classifier_is_invariant_under_its_views(skewed) -> None:
    adapter = _adapter(skewed.cls("w"), tile=12)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    for mode in ("flips", "d4"):
        mean = _mean_probabilities(adapter, x, mode)
        assert mean.shape == (3, 4)
        for view in VIEWS[mode]:
            got = _mean_probabilities(adapter, view.apply(x), mode)
            torch.testing.assert_close(got, mean, atol=1e-5, rtol=1e-5)
        records = adapter.postprocess(augmented_forward(adapter, x, VIEWS[mode]), 12)
        best = mean.max(dim=1)
        assert [int(r.class_ids[0]) for r in records] == best.indices.tolist()
        np.testing.assert_allclose([r.scores[0] for r in records], best.values.numpy(), rtol=1e-5)


def test_boxes_found_in_a_view_come_back_to_the_tile(skewed) -> None:
    """A rectangle's box read off each view of its mask (numpy) is the tile's box again."""
    size = 20
    mask = torch.zeros(1, size, size)
    mask[0, 3:9, 11:18] = 1  # rows 3..8, columns 11..17: box (11, 3, 18, 9)
    for view in VIEWS["d4"]:
        rows, cols = np.nonzero(view.apply(mask)[0].numpy())
        seen = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float32)
        np.testing.assert_array_equal(view.undo_boxes(seen, size), [[11, 3, 18, 9]])


def test_tta_values_are_checked() -> None:
    assert [normalise_tta(v) for v in (None, False, "none", "off", "FLIPS", "d4")] == [
        "none",
        "none",
        "none",
        "none",
        "flips",
        "d4",
    ]
    with pytest.raises(ConfigError, match="does not say which views; use tta=flips"):
        normalise_tta(True)
    with pytest.raises(ConfigError, match="tta='d8' is not supported; use one of none, flips, d4"):
        normalise_tta("d8")


def _square_image(path: Path, data: np.ndarray) -> Path:
    return write_utm_rgb(path, data, 0.1)


@pytest.mark.slow
def test_a_turned_raster_gives_the_turned_class_map_with_d4(skewed, tmp_path: Path, capsys) -> None:
    """End to end: the class map of a raster turned a quarter is the turned class map, with
    tta=d4 (not without: the model has no symmetry of its own); the summary says tta."""
    data = np.random.default_rng(5).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    plain = _square_image(tmp_path / "a.tif", data)
    turned = _square_image(tmp_path / "b.tif", np.ascontiguousarray(np.rot90(data, 1, (1, 2))))

    def class_map(image: Path, run: Path, *more: str) -> np.ndarray:
        args = segmentation_args(image, run, *more, model="mgpr_tta_models:seg", tile_size=64)
        assert run_mgpr_inprocess(*args, "overlap=0") == 0
        with rasterio.open(run / "segmentation" / f"{image.stem}.tif") as src:
            return src.read(1)

    a = class_map(plain, tmp_path / "a0")
    b = class_map(turned, tmp_path / "b0")
    assert not np.array_equal(np.rot90(a, 1), b)
    capsys.readouterr()
    a = class_map(plain, tmp_path / "a8", "tta=d4")
    out = capsys.readouterr().out
    b = class_map(turned, tmp_path / "b8", "tta=d4")
    assert np.array_equal(np.rot90(a, 1), b) and len(np.unique(a)) == 3
    assert ", tta d4 (8 views)" in out
    summary = json.loads((tmp_path / "a8" / "summary.json").read_text())
    assert summary["tta"] == {"mode": "d4", "views": 8}
    assert json.loads((tmp_path / "a8" / "run.json").read_text())["fingerprint"]["tta"] == "d4"
    # Another tta is another run: its results are other class scores
    capsys.readouterr()
    args = segmentation_args(plain, tmp_path / "a8", model="mgpr_tta_models:seg", tile_size=64)
    assert run_mgpr_inprocess(*args, "overlap=0", "tta=flips") == 2
    err = capsys.readouterr().err
    assert "tta differs" in err and "Traceback" not in err


def _boxes(run: Path) -> list[tuple[float, ...]]:
    from conftest import read_gpkg_layer

    _geoms, rows, _srs = read_gpkg_layer(run / "predictions.gpkg", "detections")
    return sorted(
        (r["px_xmin"], r["px_ymin"], r["px_xmax"], r["px_ymax"], round(r["score"], 6)) for r in rows
    )


@pytest.mark.slow
def test_a_turned_raster_gives_the_turned_boxes_with_d4(skewed, tmp_path: Path) -> None:
    """Detection: each view's boxes back in the tile's frame, fused by NMS: a raster turned a
    quarter gives the turned boxes with their scores, with tta=d4 (not without: the detector
    shifts its boxes right and scores by position); every blob once (its views' boxes lie 1 px
    apart, above nms_iou=0.5 of each other)."""
    data = np.zeros((3, 64, 64), np.uint8)
    for r, c, h, w in [(5, 8, 8, 12), (30, 40, 12, 8), (44, 10, 9, 9)]:  # >= 8 px: IoU > 0.5
        data[:, r : r + h, c : c + w] = 255
    plain = _square_image(tmp_path / "a.tif", data)
    turned = _square_image(tmp_path / "b.tif", np.ascontiguousarray(np.rot90(data, 1, (1, 2))))

    def boxes(image: Path, run: Path, *more: str) -> list[tuple[float, ...]]:
        args = segmentation_args(image, run, *more, model="mgpr_tta_models:det", tile_size=64)
        assert run_mgpr_inprocess(*args, "overlap=0") == 0
        return _boxes(run)

    def turn(b: list[tuple[float, ...]]) -> list[tuple[float, ...]]:  # (x, y) -> (y, 64 - x)
        return sorted((y1, 64 - x2, y2, 64 - x1, s) for x1, y1, x2, y2, s in b)

    assert turn(boxes(plain, tmp_path / "a0")) != boxes(turned, tmp_path / "b0")
    a = boxes(plain, tmp_path / "a8", "tta=d4")
    b = boxes(turned, tmp_path / "b8", "tta=d4")
    assert len(a) == 3 and turn(a) == b


def test_the_null_model_refuses_tta(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=200, height=200, objects=2)
    args = segmentation_args(Path(img.path), tmp_path / "null", "tta=d4", model="null")
    assert run_mgpr_inprocess(*args) == 2
    err = capsys.readouterr().err
    assert "model=null returns one mean brightness per tile" in err and "Traceback" not in err
    assert not (tmp_path / "null" / "parts").exists()


@pytest.mark.slow
def test_the_reference_detector_with_tta_finds_every_planted_object(tmp_path: Path) -> None:
    """The quick start with tta=flips: the reference detector is exact in every view, so the
    fused boxes are the planted objects' footprints, each once."""
    assert run_mgpr_inprocess("tta=flips", "image_size=1024", "objects=12",
                              f"output_dir={tmp_path / 'run'}") == 0  # fmt: skip
    check = json.loads((tmp_path / "run" / "summary.json").read_text())["demo_check"]
    assert (check["found"], check["missed"], check["duplicates"]) == (12, 0, 0)
    assert check["unmatched_detections"] == 0 and check["max_footprint_error_px"] == 0.0


def test_fused_boxes_keep_the_best_then_the_largest_under_the_cap() -> None:
    """Equal scores (the reference detector's 1.0) keep the larger boxes, as without tta."""
    from mgpr.models.base import Detections
    from mgpr.models.tta import fuse_detections

    boxes = np.array([[0, 0, 4, 4], [10, 10, 19, 19], [30, 0, 36, 6]], np.float32)
    dets = Detections(boxes=boxes, scores=np.ones(3, np.float32), labels=np.zeros(3, np.int64))
    views = VIEWS["flips"]
    per_view = [[Detections(v_boxes, dets.scores, dets.labels)] for v_boxes in (
        _in_view(boxes, view, 40) for view in views)]  # fmt: skip
    fused = fuse_detections(per_view, views, 40, 0.5, cap=2)[0]
    np.testing.assert_allclose(fused.boxes, boxes[[1, 2]])  # the two largest, each once
    assert len(fuse_detections(per_view, views, 40, 0.5, cap=None)[0]) == 3


def _in_view(boxes: np.ndarray, view, size: int) -> np.ndarray:
    """The boxes as the view sees them: read off the view of a mask of each box."""
    out = []
    for x1, y1, x2, y2 in boxes.astype(int):
        mask = torch.zeros(1, size, size)
        mask[0, y1:y2, x1:x2] = 1
        rows, cols = np.nonzero(view.apply(mask)[0].numpy())
        out.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return np.asarray(out, np.float32)


def test_weighted_box_fusion_averages_boxes_and_scores_by_the_views_that_found_them() -> None:
    from mgpr.models.tta import weighted_box_fusion

    boxes = np.array(
        [
            [10, 10, 20, 20],  # one object in 4 views, 1 px apart, left-right
            [11, 10, 21, 20],
            [9, 10, 19, 20],
            [10, 10, 20, 20],
            [40, 40, 50, 50],  # one view only
            [10, 10, 20, 20],  # same place, another class
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.6, 0.6, 0.3, 0.8, 0.5], np.float32)
    labels = np.array([1, 1, 1, 1, 1, 2], np.int64)
    fused, fused_scores, fused_labels, picked = weighted_box_fusion(boxes, scores, labels, 0.5, 4)
    assert fused_labels.tolist() == [1, 1, 2] and picked.tolist() == [0, 4, 5]
    np.testing.assert_allclose(fused[0], [10, 10, 20, 20], atol=1e-6)  # 0.6 * (+1) + 0.6 * (-1)
    np.testing.assert_allclose(fused_scores, [0.6, 0.8 / 4, 0.5 / 4], rtol=1e-6)
    shifted = boxes[:2].copy()
    _f, _s, _l, _p = weighted_box_fusion(
        shifted, np.array([0.9, 0.3], np.float32), labels[:2], 0.5, 2
    )
    np.testing.assert_allclose(_f[0], [10.25, 10, 20.25, 20], atol=1e-6)  # score-weighted


def test_wbf_holds_the_fused_scores_to_the_score_threshold() -> None:
    """An object one view of four found keeps a quarter of its score, which may fall below
    ``score_threshold``: such boxes are dropped, as every view's were (52 boxes under 0.6 were
    written with score_threshold=0.6 before)."""
    from mgpr.models.base import Detections
    from mgpr.models.tta import fuse_detections

    views = VIEWS["flips"]
    everywhere = np.array([[10, 10, 20, 20]], np.float32)
    per_view = []
    for i, view in enumerate(views):
        boxes = _in_view(everywhere, view, 40)
        scores = np.array([0.9], np.float32)
        if i == 0:  # a second object only the first (identity) view finds
            boxes = np.concatenate([boxes, np.array([[25, 25, 35, 35]], np.float32)])
            scores = np.array([0.9, 0.8], np.float32)
        per_view.append([Detections(boxes, scores, np.ones(len(scores), np.int64))])
    kept_all = fuse_detections(per_view, views, 40, 0.5, None, "wbf")[0]
    np.testing.assert_allclose(np.sort(kept_all.scores), [0.2, 0.9], rtol=1e-6)
    fused = fuse_detections(per_view, views, 40, 0.5, None, "wbf", min_score=0.6)[0]
    np.testing.assert_allclose(fused.scores, [0.9], rtol=1e-6)
    np.testing.assert_allclose(fused.boxes, everywhere, atol=1e-5)
    assert (fused.scores >= 0.6).all() and len(fused.labels) == 1


@pytest.mark.slow
def test_wbf_averages_out_a_box_bias_that_nms_keeps(skewed, tmp_path: Path, capsys) -> None:
    """A detector that puts every box 1 px right of its object: tta=flips with NMS keeps one
    view's box (1 px off), with tta_fusion=wbf the mirrored views cancel it (exact); the run
    says so, records it, and a resume with the other fusion is another run."""
    data = np.zeros((3, 64, 64), np.uint8)
    truth = [(5, 8, 8, 12), (30, 40, 12, 8), (44, 10, 9, 9)]
    for r, c, h, w in truth:
        data[:, r : r + h, c : c + w] = 255
    image = _square_image(tmp_path / "a.tif", data)
    want = sorted((c, r, c + w, r + h) for r, c, h, w in truth)

    def boxes(run: Path, *more: str) -> list[tuple[float, ...]]:
        args = segmentation_args(image, run, "tta=flips", *more, model="mgpr_tta_models:shifted")
        assert run_mgpr_inprocess(*args, "tile_size=64", "overlap=0") == 0
        return [b[:4] for b in _boxes(run)]

    def error(got: list[tuple[float, ...]]) -> float:
        return float(np.abs(np.array(got) - np.array(want)).max())

    capsys.readouterr()
    assert error(boxes(tmp_path / "plain", "tta=none", "tta_fusion=wbf")) == 1.0
    assert "tta_fusion=wbf fuses a detector's tta views; this run has no tta" in (
        capsys.readouterr().err
    )
    assert error(boxes(tmp_path / "nms")) == 1.0
    capsys.readouterr()
    fused = boxes(tmp_path / "wbf", "tta_fusion=wbf")
    assert len(fused) == 3 and error(fused) < 1e-4
    assert ", tta flips (4 views, boxes by wbf)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "wbf" / "summary.json").read_text())
    assert summary["tta"] == {"mode": "flips", "views": 4, "fusion": "wbf"}
    assert [s["score"] for s in _rows(tmp_path / "wbf")] == pytest.approx([0.9] * 3)
    args = segmentation_args(image, tmp_path / "wbf", "tta=flips", model="mgpr_tta_models:shifted")
    assert run_mgpr_inprocess(*args, "tile_size=64", "overlap=0") == 2
    assert "tta_fusion" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tta_fusion='mean' is not supported"):
        from mgpr.conf.load import load_config

        load_config(["tta_fusion=mean"])


def _rows(run: Path) -> list[dict]:
    from conftest import read_gpkg_layer

    return read_gpkg_layer(run / "predictions.gpkg", "detections")[1]
