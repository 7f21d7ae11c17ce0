"""``mean``/``std``: a fine-tuned network's own input statistics instead of ImageNet's.

A ResNet fine-tuned with its dataset's statistics (a common remote-sensing recipe) could only
be served with ImageNet's; the keys replace the model's normalisation step (classifier,
embedder and segmenter ``prepare``; the detectors' own transform).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import read_gpkg_layer, run_mgpr_inprocess

from mgpr.conf.load import load_config
from mgpr.errors import ConfigError
from mgpr.models import build_model

MEAN, STD = [0.3, 0.35, 0.4], [0.1, 0.12, 0.15]


def test_classifier_and_detector_take_the_given_statistics() -> None:
    classifier = build_model("resnet50", "none")
    x = torch.rand(2, 3, 32, 32)
    default = classifier.prepare(x.clone())
    classifier.set_normalisation(MEAN, STD)
    given = classifier.prepare(x.clone())
    want = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(given, want)
    assert not torch.allclose(default, given)
    detector = build_model("fasterrcnn", "none")
    detector.set_normalisation(MEAN, STD)
    assert detector.module.transform.image_mean == MEAN
    assert detector.module.transform.image_std == STD


def test_a_run_classifies_with_the_given_statistics(make_image, tmp_path: Path) -> None:
    img = make_image(width=128, height=128, objects=2, seam_share=0)
    run = tmp_path / "run"
    keys = [f"input_path={img.path}", "model=resnet50", "weights=none", "tile_size=128",
            "workers=0", "topk=1", "precision=32"]  # fmt: skip
    assert run_mgpr_inprocess(*keys, f"output_dir={run}", f"mean={MEAN}", f"std={STD}") == 0
    _, rows, _ = read_gpkg_layer(run / "predictions.gpkg", "classifications")
    # the same seeded network, fed by hand
    adapter = build_model("resnet50", "none")
    with rasterio.open(img.path) as src:
        tile = torch.from_numpy(src.read().astype(np.float32) / 255.0)[None]
    x = (tile - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        probs = adapter.module(x).softmax(1)[0]
    assert rows[0]["class_id_1"] == int(probs.argmax())
    assert rows[0]["score_1"] == pytest.approx(float(probs.max()), abs=1e-4)
    fingerprint = json.loads((run / "run.json").read_text())["fingerprint"]
    assert fingerprint["normalisation"] == {"mean": MEAN, "std": STD}
    # another normalisation is another run: refused on resume
    code = run_mgpr_inprocess(*keys, f"output_dir={run}", "mean=[0.5,0.5,0.5]", f"std={STD}")
    assert code == 2


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (["mean=[0.5,0.5,0.5]"], "mean is given without std"),
        (["mean=[0.5,0.5]", "std=[0.2,0.2,0.2]"], "mean has 2 value(s) and std 3"),
        (["mean=[0.5,0.5,0.5]", "std=[0.2,0,0.2]"], "must be above 0"),
        (["mean=[123.7,116.3,103.5]", "std=[58.4,57.1,57.4]"],
         "look like 0..255 units; mgpr normalises the scaled [0, 1] input"),
    ],
)  # fmt: skip
def test_malformed_statistics_are_one_line(keys: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(keys)
    assert needle in str(err.value)


def test_band_count_and_models_without_normalisation_are_refused(tmp_path: Path, capsys) -> None:
    classifier = build_model("resnet50", "none")
    with pytest.raises(ConfigError, match=r"give 4 value\(s\) but model=resnet50 takes 3"):
        classifier.set_normalisation([0.5] * 4, [0.2] * 4)
    code = run_mgpr_inprocess(
        "model=reference", "mean=[0.5,0.5,0.5]", "std=[0.2,0.2,0.2]", f"output_dir={tmp_path}/r"
    )
    assert code == 2
    assert "model=reference reads the scaled [0, 1] input as it is" in capsys.readouterr().err


class _Mean(torch.nn.Module):
    """A user's classifier whose two logits are its input's mean and minus it (band 1)."""

    in_bands = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, 0].mean(dim=(1, 2))
        return torch.stack([m, -m], dim=1)


def test_a_users_module_is_normalised_only_when_asked() -> None:
    from mgpr.models.custom import ModuleAdapter

    options = {"weights": "none", "topk": 1, "score_threshold": 0.0, "tile_size": 8}
    adapter = ModuleAdapter(_Mean(), name="mods:build", **options)
    x = torch.full((1, 3, 8, 8), 0.5)
    torch.testing.assert_close(adapter.prepare(x.clone()), x)  # [0, 1] as it is by default
    adapter.set_normalisation(MEAN, STD)
    torch.testing.assert_close(
        adapter.prepare(x.clone())[0, :, 0, 0], torch.tensor([2.0, 1.25, 2 / 3])
    )
    raw = ModuleAdapter(_Mean(), name="mods:raw", **options)
    raw.input_range = "raw"
    with pytest.raises(ConfigError, match="asks for raw values"):
        raw.set_normalisation(MEAN, STD)
