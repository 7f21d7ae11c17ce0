"""``categories=[...]``: the user names a model's classes (a fine-tuned checkpoint's ``0, 1, ...``).

The names must reach every output that shows a class (layers, class map tags, summary) and must
never shift onto another class: another count than the model's is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


_USER_CLASSIFIERS = '''
import torch


class MeanLinear(torch.nn.Module):
    """Tile mean per band -> K logits: a classifier with no class names."""

    def __init__(self, k):
        super().__init__()
        self.lin = torch.nn.Linear(3, k)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))


def binary(weights):
    torch.manual_seed(0)
    net = MeanLinear(1)
    with torch.no_grad():
        net.lin.weight.fill_(10.0)  # bright tiles: a positive logit, class 1
        net.lin.bias.fill_(-1.0)
    return net


def four(weights):
    torch.manual_seed(0)
    return MeanLinear(4)


def four_declared(weights):
    net = four(weights)
    net.task = "classification"  # no probe at build: categories= makes one
    return net


def four_named_two(weights):
    net = four(weights)
    net.categories = ["a", "b"]
    return net
'''


def test_a_user_classifiers_names_are_counted_before_any_tile(
    make_image, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A user's classifier names no classes, so its logits count them: one name for one binary
    logit is class 1's (after background, as the module's own ``categories``), another count
    is refused before any tile, by key or by the module's attribute."""
    (tmp_path / "mgpr_user_classifiers.py").write_text(_USER_CLASSIFIERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    img = make_image(width=256, height=256)

    def run(model: str, *keys: str) -> tuple[int, Path]:
        out = tmp_path / f"run-{model}-{len(keys) and keys[0]}"
        args = segmentation_args(img.path, out, *keys, model=f"mgpr_user_classifiers:{model}")
        return run_mgpr_inprocess(*args, "weights=none"), out

    rc, out = run("binary", "categories=[tree]")
    assert rc == 0
    _geoms, rows, _srs = read_gpkg_layer(out / "predictions.gpkg", "classifications")
    assert rows and all((r["class_id_1"], r["label_1"]) == (1, "tree") for r in rows)
    assert all(r["label_2"] == "background" for r in rows)
    for model, names, want in (
        ("four", "[a,b]", "gives 2 names but model=mgpr_user_classifiers:four returns 4 class"),
        ("four_declared", "[a,b,c]", "gives 3 names but model=mgpr_user_classifiers:four_decl"),
        ("binary", "[a,b,c]", "returns 1 class logit(s) per tile (one binary logit: name its"),
        ("four_named_two", "", "returns 4 class logit(s) per tile but names 2 categories"),
    ):
        capsys.readouterr()
        rc, out = run(model, *([f"categories={names}"] if names else []))
        err = capsys.readouterr().err
        assert rc == 2 and want in err and "Traceback" not in err, err
        assert not (out / "predictions.gpkg").exists()
    rc, out = run("four_declared", "categories=[a,b,c,d]")
    assert rc == 0
    _geoms, rows, _srs = read_gpkg_layer(out / "predictions.gpkg", "classifications")
    assert all(r["label_1"] == "abcd"[r["class_id_1"]] for r in rows)


def test_a_detector_named_without_its_background_is_told_to_name_it_first() -> None:
    """A 2-class fine-tuned Faster R-CNN (background + tree) given categories=[tree]."""
    from types import SimpleNamespace

    from mgpr.errors import ConfigError
    from mgpr.run.adapter import name_categories

    detector = SimpleNamespace(name="fasterrcnn", task="detection", categories=("0", "1"))
    with pytest.raises(ConfigError) as err:
        name_categories(detector, ["tree"])
    assert "has 2 classes (id 0 is the background)" in str(err.value)
    assert str(err.value).endswith("name the background first: categories=[background,tree]")
    name_categories(detector, ["background", "tree"])
    assert detector.categories == ("background", "tree")
