"""Detection boxes under mixed precision: the backbone in bf16, every coordinate in fp32.

CPU autocast with ``precision=bf16-mixed`` explicitly (what ``precision=auto`` picks is the
device's business and never asserted here). torchvision's own forward builds anchors and decodes
boxes in the feature maps' dtype, so under bf16 an edge between 512 and 1024 px sits on a 4 px
step; mgpr's detectors must not.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_gpkg_layer, run_mgpr_inprocess
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    retinanet_resnet50_fpn,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.resnet import Bottleneck
from torchvision.ops import box_iou

from mgpr.data.scaling import ValueScaler
from mgpr.models import Detections, ModelAdapter, build_model
from mgpr.models.custom import ModuleAdapter
from mgpr.testimage import TestImageSpec, render_block

#: Planted objects (>= 240 in every band) on a textured background: what the detectors see.
SPEC = TestImageSpec(width=1024, height=1024, objects=40, seed=3)
#: Matched boxes (same label, one-to-one, IoU >= MATCH_IOU) agree with fp32 within this.
MAX_EDGE_ERROR_PX = 0.5
MATCH_IOU = 0.9
#: Share of fp32 boxes that must find a bf16 partner (random weights: scores are near-ties, so
#: a few boxes at the score/NMS margins are kept by one precision only).
MIN_MATCHED = 0.8


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _on_step(values: torch.Tensor, step: float) -> float:
    """Share of ``values`` that are exact multiples of ``step``."""
    return float((torch.remainder(values, step) == 0).float().mean())


def seeded_fasterrcnn_state(size: int) -> dict[str, torch.Tensor]:
    """A seeded Faster R-CNN state_dict that is well conditioned, as trained weights are.

    Plain random weights make a chaotic ResNet-50 (bf16 rounding changes its feature maps by
    ~30 %, so fp32 and bf16 find unrelated boxes and no tolerance is testable). Zero-initialised
    residual branches (torchvision's ``zero_init_residual``) and batch-norm statistics measured
    on the planted-object tiles give a network whose bf16 features are within ~2 % of fp32.
    """
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    ).eval()
    return calibrate_resnet_backbone(model, size).state_dict()


def calibrate_resnet_backbone(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """``model`` (a torchvision detector on a ResNet FPN backbone) made well conditioned.

    Zero residual branches and batch-norm statistics from four ``size`` px planted-object tiles
    (see :func:`seeded_fasterrcnn_state`); returns the model in eval mode.
    """
    for mod in model.backbone.body.modules():
        if isinstance(mod, Bottleneck):
            torch.nn.init.zeros_(mod.bn3.weight)
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average over the calibration batch
            mod.reset_running_stats()
    tiles = [
        torch.from_numpy(render_block(SPEC, r, c, size, size)).float().div(255)
        for r in (0, size)
        for c in (0, size)
    ]
    model.backbone.train()
    with torch.no_grad():
        batch, _ = model.transform(tiles)
        model.backbone(batch.tensors)
    return model.eval()


def match_boxes(a: Detections, b: Detections, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one pairs (i in a, j in b) of the same label, greedily by IoU, IoU >= min_iou."""
    if not len(a) or not len(b):
        return []
    iou = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).numpy()
    iou[a.labels[:, None] != b.labels[None, :]] = 0.0
    pairs = []
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] < min_iou:
            return pairs
        pairs.append((int(i), int(j)))
        iou[i, :] = 0.0
        iou[:, j] = 0.0


@pytest.fixture(scope="module")
def seeded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frcnn") / "seeded_fasterrcnn.pth"
    torch.save(seeded_fasterrcnn_state(128), path)
    return path


def test_fasterrcnn_bf16_boxes_are_not_quantised_at_1024_px() -> None:
    """Edges between 512 and 1024 px: on a 4 px step with torchvision's forward, not with ours.

    A 1024 px wide strip (the step depends on the coordinate's magnitude, and the strip costs
    1/16 of a 1024 px square); ``min_size = max_size = 1024`` so nothing is resized.
    """
    torch.manual_seed(0)
    adapter = build_model("fasterrcnn", "none", tile_size=1024, score_threshold=0.0)
    strip = torch.from_numpy(render_block(SPEC, 0, 0, 64, 1024))[None]
    with torch.inference_mode(), _bf16():
        inputs = adapter.prepare(ValueScaler()(strip))
        ours = adapter.forward(inputs)[0]["boxes"]
        theirs = adapter.module(inputs)[0]["boxes"]  # torchvision's own forward
    assert ours.dtype == torch.float32
    far = ours[:, 0::2][(ours[:, 0::2] > 512) & (ours[:, 0::2] < 1024)]
    far_theirs = theirs[:, 0::2][(theirs[:, 0::2] > 512) & (theirs[:, 0::2] < 1024)]
    assert far.numel() >= 20 and far_theirs.numel() >= 20
    assert _on_step(far_theirs.float(), 4.0) == 1.0  # the bug this guards against
    assert _on_step(far, 4.0) < 0.05
    assert _on_step(far, 0.5) < 0.1  # not on any coarse grid either


def fp32_and_bf16(adapter: ModelAdapter) -> list[tuple[Detections, Detections]]:
    """(fp32, bf16) detections of two 128 px planted-object tiles through ``adapter``."""
    tiles = torch.from_numpy(np.stack([render_block(SPEC, 0, c, 128, 128) for c in (0, 128)]))
    with torch.inference_mode():
        inputs = adapter.prepare(ValueScaler()(tiles))
        fp32 = adapter.postprocess(adapter.forward(inputs), 128)
        with _bf16():
            bf16 = adapter.postprocess(adapter.forward(inputs), 128)
    pairs = list(zip(fp32, bf16, strict=True))
    assert all(isinstance(d, Detections) for pair in pairs for d in pair)
    return pairs


def assert_boxes_agree(ref: Detections, got: Detections) -> None:
    """>= 50 fp32 boxes; >= MIN_MATCHED of them matched in ``got``, within MAX_EDGE_ERROR_PX."""
    assert len(ref) >= 50
    pairs = match_boxes(got, ref, MATCH_IOU)
    assert len(pairs) >= MIN_MATCHED * len(ref)
    errors = [np.abs(got.boxes[i] - ref.boxes[j]).max() for i, j in pairs]
    assert max(errors) <= MAX_EDGE_ERROR_PX, sorted(errors)[-5:]


def test_fasterrcnn_bf16_agrees_with_fp32_seeded_checkpoint(seeded_checkpoint: Path) -> None:
    adapter = build_model("fasterrcnn", str(seeded_checkpoint), tile_size=128, score_threshold=0.0)
    for ref, got in fp32_and_bf16(adapter):
        assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32
        assert_boxes_agree(ref, got)


def single_stage_detector(name: str, size: int) -> torch.nn.Module:
    """torchvision's RetinaNet or FCOS (ResNet-50 FPN, ``size`` px, no resize) or SSDlite (its
    own 320 px resize), seeded random weights, every box kept, as a user's ``build`` returns it.
    """
    torch.manual_seed(0)
    keep = {"weights": None, "weights_backbone": None, "score_thresh": 0.0}
    if name == "ssdlite":
        model = ssdlite320_mobilenet_v3_large(**keep, detections_per_img=300)
    else:
        build = {"retinanet": retinanet_resnet50_fpn, "fcos": fcos_resnet50_fpn}[name]
        model = build(**keep, min_size=size, max_size=size, detections_per_img=300)
    if name == "fcos":
        # Random FCOS regressions are ~0 after its ReLU: every box collapses onto its anchor's
        # centre, a multiple of 4 px whatever the precision. A bias gives the boxes extent.
        torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.37)
    model.task = "detection"  # as a user's module may say; skips the probe forward
    return model.eval()


@pytest.mark.parametrize("name", ["retinanet", "fcos", "ssdlite"])
def test_single_stage_bf16_boxes_are_not_quantised(name: str) -> None:
    """A user's torchvision RetinaNet, FCOS or SSD: float32 boxes under bf16, on no 4 px step;
    without autocast exactly what torchvision's own forward returns."""
    module = single_stage_detector(name, 1024)
    adapter = ModuleAdapter(
        module, name=name, weights="none", topk=1, score_threshold=0.0, tile_size=1024
    )
    strip = torch.from_numpy(render_block(SPEC, 0, 0, 64, 1024))[None]
    with torch.inference_mode():
        inputs = adapter.prepare(ValueScaler()(strip))
        exact = adapter.forward(inputs)[0]
        plain = module(list(inputs.unbind(0)))[0]
        with _bf16():
            ours = adapter.forward(inputs)[0]["boxes"]
            theirs = module(list(inputs.unbind(0)))[0]["boxes"]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(exact[key], plain[key]), key
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    far = ours[:, 0::2][(ours[:, 0::2] > 512) & (ours[:, 0::2] < 1024)]
    far_theirs = theirs[:, 0::2][(theirs[:, 0::2] > 512) & (theirs[:, 0::2] < 1024)]
    assert far.numel() >= 20 and far_theirs.numel() >= 20
    assert _on_step(far_theirs.float(), 4.0) == 1.0  # the bug this guards against
    assert _on_step(far, 4.0) < 0.05
    assert _on_step(far, 0.5) < 0.1


def test_retinanet_bf16_agrees_with_fp32_calibrated_backbone() -> None:
    """Boxes and scores of a user's RetinaNet under bf16 match fp32 ones within 0.5 px.

    The dense head runs in float32 too: bf16 class logits near RetinaNet's prior (-4.6) sit on
    a 0.03 step, and the ties that makes would reorder the top-k and NMS.
    """
    module = calibrate_resnet_backbone(single_stage_detector("retinanet", 128), 128)
    adapter = ModuleAdapter(
        module, name="retinanet", weights="none", topk=1, score_threshold=0.0, tile_size=128
    )
    for ref, got in fp32_and_bf16(adapter):
        assert got.scores.dtype == np.float32
        assert_boxes_agree(ref, got)
        # Scores are float32 logits put through a sigmoid: no bf16 ties.
        assert len(np.unique(got.scores)) > 0.9 * len(got)


def test_max_detections_limits_boxes_per_tile(seeded_checkpoint: Path) -> None:
    adapter = build_model(
        "fasterrcnn", str(seeded_checkpoint), tile_size=128, score_threshold=0.0, max_detections=7
    )
    tiles = torch.from_numpy(render_block(SPEC, 0, 0, 128, 128))[None]
    with torch.inference_mode():
        (det,) = adapter.predict(tiles, 128)
    assert len(det) == 7 and np.all(np.diff(det.scores) <= 0)  # the best 7

    reference = build_model("reference", max_detections=2)
    tile = torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    tile[:, :, 0:3, 0:3] = 250  # 9 px
    tile[:, :, 10:20, 10:20] = 250  # 100 px
    tile[:, :, 40:44, 40:44] = 250  # 16 px
    tile[:, :, 50:54, 0:4] = 250  # 16 px, later in raster order
    with torch.inference_mode():
        (kept,) = reference.predict(tile, 64)
    np.testing.assert_array_equal(kept.boxes, [[10, 10, 20, 20], [40, 40, 44, 44]])


def test_reference_detector_bf16_run_equals_fp32_run(tmp_path: Path) -> None:
    """The quick start under Lightning's bf16-mixed plugin: the same boxes, to the bit."""
    outputs = {}
    for precision in ("32", "bf16-mixed"):
        run = tmp_path / precision
        rc = run_mgpr_inprocess(
            f"output_dir={run}",
            "image_size=1024",
            "objects=16",
            "workers=0",
            f"precision={precision}",
            "progress=false",
        )
        assert rc == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["precision"] == ("32-true" if precision == "32" else "bf16-mixed")
        check = summary["demo_check"]
        assert check["found"] == check["planted"] == 16
        assert check["max_footprint_error_px"] < 0.5
        geoms, _, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
        outputs[precision] = sorted(g.bounds for g in geoms)
    assert outputs["bf16-mixed"] == outputs["32"]


def test_users_retinanet_from_the_cli_under_bf16_keeps_exact_boxes(
    make_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mgpr model=my_module:build precision=bf16-mixed`` with a torchvision RetinaNet (a small
    backbone, random weights): the GeoPackage's pixel boxes are on no 4 px step above 512 px."""
    (tmp_path / "mgpr_user_retinanet.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torchvision.models.detection import RetinaNet
            from torchvision.models.detection.anchor_utils import AnchorGenerator

            def build(weights):
                torch.manual_seed(0)
                backbone = torch.nn.Sequential(
                    torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                    torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                )
                backbone.out_channels = 16
                anchors = AnchorGenerator(sizes=((40,),), aspect_ratios=((1.0,),))
                model = RetinaNet(
                    backbone, num_classes=2, anchor_generator=anchors, min_size=1024,
                    max_size=1024, score_thresh=0.0, detections_per_img=300,
                )
                # Random regressions are ~0: boxes would be the anchors, on a 4 px step anyway.
                torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 0.37)
                return model
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image(width=1024, height=1024, objects=4)
    run = tmp_path / "run"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}", "model=mgpr_user_retinanet:build", "tile_size=1024",
        "workers=0", "precision=bf16-mixed", "score_threshold=0", f"output_dir={run}",
        "progress=false",
    )  # fmt: skip
    assert rc == 0
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "detections")
    edges = torch.tensor([r[k] for r in rows for k in ("px_xmin", "px_xmax")])
    far = edges[(edges > 512) & (edges < 1024)]
    assert len(rows) > 100 and far.numel() >= 20  # unset max_detections: a user's model uncapped
    assert _on_step(far, 4.0) < 0.05 and _on_step(far, 0.5) < 0.1

    capped = tmp_path / "capped"
    rc = run_mgpr_inprocess(
        f"input_path={img.path}", "model=mgpr_user_retinanet:build", "tile_size=1024",
        "workers=0", "precision=bf16-mixed", "score_threshold=0", "max_detections=7",
        f"output_dir={capped}", "progress=false",
    )  # fmt: skip
    assert rc == 0
    _, kept, _ = read_gpkg_layer(capped / "predictions.gpkg", "detections")
    best = sorted((r["score"] for r in rows), reverse=True)[:7]
    assert sorted((r["score"] for r in kept), reverse=True) == best


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_head_towers_run_in_bf16_and_its_output_layers_in_fp32(name: str) -> None:
    """Where the time goes stays fast (the towers' convolutions under autocast); the layers
    whose outputs become logits and box deltas run in float32; the model is left unpatched."""
    from mgpr.models.detection import exact_detector_forward, head_output_layers

    module = single_stage_detector(name, 128)
    outputs = head_output_layers(module.head)
    assert outputs is not None and len(outputs) == (3 if name == "fcos" else 2)
    towers = [module.head.classification_head.conv, module.head.regression_head.conv]
    seen: dict[str, set[torch.dtype]] = {"outputs": set(), "towers": set()}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen["outputs"].add(out.dtype)) for m in outputs
    ]
    hooks += [
        m.register_forward_hook(lambda _m, _i, out: seen["towers"].add(out.dtype)) for m in towers
    ]
    tile = torch.from_numpy(render_block(SPEC, 0, 0, 128, 128)).float().div(255)
    with torch.inference_mode(), _bf16():
        exact_detector_forward(module, [tile])
    for hook in hooks:
        hook.remove()
    assert seen == {"outputs": {torch.float32}, "towers": {torch.bfloat16}}
    assert all("forward" not in layer.__dict__ for layer in outputs)


def test_a_subclass_with_its_own_forward_keeps_it() -> None:
    """Only torchvision's own eval forward is re-stated in float32; an override is the user's."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from mgpr.models.detection import is_torchvision_detector

    class Tweaked(RetinaNet):
        def forward(self, images, targets=None):  # type: ignore[no-untyped-def]
            return [
                {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
            ]

    class Renamed(RetinaNet):
        pass

    backbone = torch.nn.Conv2d(3, 4, 3, stride=8)
    backbone.out_channels = 4  # type: ignore[assignment]
    anchors = AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),))
    assert not is_torchvision_detector(Tweaked(backbone, 2, anchor_generator=anchors))
    assert is_torchvision_detector(Renamed(backbone, 2, anchor_generator=anchors))
    assert is_torchvision_detector(single_stage_detector("ssdlite", 320))
    assert not is_torchvision_detector(torch.nn.Conv2d(3, 3, 1))


def test_best_keeps_the_highest_scores_and_ties_in_order() -> None:
    det = Detections(
        boxes=np.arange(20, dtype=np.float32).reshape(5, 4),
        scores=np.array([0.2, 0.9, 0.5, 0.9, 0.1], np.float32),
        labels=np.arange(5, dtype=np.int64),
    )
    top = det.best(3)
    np.testing.assert_array_equal(top.labels, [1, 3, 2])
    np.testing.assert_array_equal(top.boxes, det.boxes[[1, 3, 2]])
    assert det.best(5) is det and len(Detections.empty().best(1)) == 0


def test_fingerprint_max_detections_unset_is_100_for_built_ins_and_none_for_user_models() -> None:
    from mgpr.conf.schema import PredictConfig
    from mgpr.run.identity import fingerprint

    def recorded(model: str, **keys: int) -> object:
        return fingerprint(PredictConfig(**keys), model, "none", [], {})["max_detections"]

    assert recorded("fasterrcnn") == recorded("resnet50") == 100  # as run.json had it before
    assert recorded("pkg.module:build") is None
    assert recorded("pkg.module:build", max_detections=100) == 100
