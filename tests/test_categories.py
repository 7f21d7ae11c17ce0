"""``categories=[...]``: the user names a model's classes (a fine-tuned checkpoint's ``0, 1, ...``).

The names must reach every output that shows a class (layers, class map tags, summary) and must
never shift onto another class: another count than the model's is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import rasterio
import torch
from conftest import read_gpkg_layer, run_mgpr_inprocess, segmentation_args


def test_a_segmenters_classes_are_named_everywhere(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=256, height=256, objects=4)
    run = tmp_path / "run"
    args = segmentation_args(img.path, run, "categories=[ground,roof]")
    assert run_mgpr_inprocess(*args) == 0
    assert "classes      by ground area: ground" in capsys.readouterr().out
    with rasterio.open(run / "segmentation" / "ortho.tif") as src:
        assert json.loads(src.tags()["class_names"]) == ["ground", "roof"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["classes"]) == {"ground", "roof"}


def test_a_fine_tuned_classifier_gets_its_names(make_image, tmp_path: Path) -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    ckpt = tmp_path / "three.pth"
    torch.save(resnet50(num_classes=3).state_dict(), ckpt)
    img = make_image(width=256, height=256, objects=2)
    run = tmp_path / "run"
    args = segmentation_args(img.path, run, model="resnet50", overlap=0)
    assert run_mgpr_inprocess(*args, f"weights={ckpt}", "categories=[water,forest,crop]") == 0
    _geoms, rows, _srs = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    assert len(rows) == 4
    assert {r["label_1"] for r in rows} <= {"water", "forest", "crop"}
    assert all(r["label_1"] == ["water", "forest", "crop"][r["class_id_1"]] for r in rows)


def test_another_count_or_an_embedder_is_refused_before_any_tile(
    make_image, tmp_path: Path, capsys
) -> None:
    img = make_image(width=128, height=128, objects=1, seam_share=0)
    for model, names, want in (
        ("reference-seg", "[a,b,c]", "gives 3 names but model=reference-seg has 2 classes"),
        ("reference-seg", "[]", "categories=[] names no class"),
        ("resnet50-embed", "[a]", "is an embedding model (features, no classes)"),
    ):
        run = tmp_path / f"run-{model}-{len(names)}"
        args = segmentation_args(img.path, run, f"categories={names}", model=model)
        assert run_mgpr_inprocess(*args, "weights=none") == 2
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err
        assert not (run / "parts").exists() or not any((run / "parts").iterdir())
