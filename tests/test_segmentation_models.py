"""Segmentation adapters: torchvision segmenters, reference-seg, user modules (CPU, no network)."""

from __future__ import annotations

import textwrap
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

import mgpr.models.weights as weights_mod
from mgpr.conf.schema import PredictConfig
from mgpr.errors import ModelError
from mgpr.models import ClassMap, build_model
from mgpr.models.base import class_maps_from_logits
from mgpr.models.segmentation import (
    build_deeplabv3,
    build_fcn,
    build_lraspp,
    build_reference_seg,
    build_torchvision_segmenter,
)


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub at an empty temp dir and make any download attempt fail loudly."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_network(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(weights_mod, "_download", no_network)
    return home


def _tiles(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


VOC = tuple(DeepLabV3_ResNet50_Weights.DEFAULT.meta["categories"])


@pytest.mark.parametrize("build", [build_deeplabv3, build_fcn, build_lraspp])
def test_torchvision_segmenters_random_weights_shape(
    build, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        adapter = build("none", probabilities=True)
    assert "random weights (weights=none): class maps are meaningless" in caplog.text
    assert adapter.task == "segmentation" and adapter.random_weights
    assert adapter.weights_id == "none" and adapter.in_bands == 3
    assert adapter.categories == VOC and len(VOC) == 21 and VOC[0] == "__background__"
    assert getattr(adapter.module, "aux_classifier", None) is None  # inference skips it
    with torch.inference_mode():
        out = adapter.predict(_tiles(2, 72), 72)  # not a multiple of the output stride
    assert len(out) == 2
    for rec in out:
        assert isinstance(rec, ClassMap) and rec.shape == (72, 72)
        assert rec.class_ids.dtype == np.uint8 and int(rec.class_ids.max()) < 21
        assert rec.probabilities is not None and rec.probabilities.shape == (21, 72, 72)
        # the stored probabilities are round(p * 255): their sum is 255 up to rounding
        sums = rec.probabilities.astype(np.int64).sum(axis=0)
        assert np.abs(sums - 255).max() <= 11
        # the class id is the argmax; a rounded tie may hide it, never reverse it by > 1 level
        best = rec.probabilities.max(axis=0).astype(np.int64)
        picked = np.take_along_axis(rec.probabilities, rec.class_ids[None].astype(np.int64), 0)
        assert (best - picked[0]).max() <= 1


def test_segmenter_without_probabilities_returns_ids_only() -> None:
    adapter = build_lraspp("none")
    with torch.inference_mode():
        (rec,) = adapter.predict(_tiles(1, 64), 64)
    assert rec.probabilities is None and rec.shape == (64, 64)


def test_segmenter_checkpoint_with_aux_head_and_other_class_count(tmp_path: Path) -> None:
    """Fine-tuned: the class count read from the head, the training-only aux head ignored."""
    source = build_lraspp("none").module
    head = source.classifier
    head.low_classifier = torch.nn.Conv2d(head.low_classifier.in_channels, 3, 1)
    head.high_classifier = torch.nn.Conv2d(head.high_classifier.in_channels, 3, 1)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}  # a Lightning-style prefix
    state["model.aux_classifier.4.weight"] = torch.zeros(3, 10, 1, 1)
    path = tmp_path / "lraspp3.pth"
    torch.save(state, path)
    adapter = build_lraspp(str(path))
    assert adapter.categories == ("0", "1", "2") and not adapter.random_weights
    assert adapter.weights_id.startswith(f"file:{path.resolve()}#sha256:")
    x = _tiles(1, 64).float().div(255)
    with torch.inference_mode():
        raw = adapter.forward(adapter.prepare(x.clone()))
        want = source.eval()(adapter.prepare(x.clone()))["out"]
    assert raw.shape == (1, 3, 64, 64)
    torch.testing.assert_close(raw, want)
    bad = dict(state)
    bad["model.classifier.cbr.0.weight"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(ModelError, match=r"shape mismatch .*classifier\.cbr\.0\.weight"):
        build_lraspp(str(path))


def test_segmenter_weights_names_not_downloadable_until_registered() -> None:
    """Unregistered (stage 1): a weights name is refused in one line, never random weights."""
    with pytest.raises(ModelError, match="weights=NOPE is not a weights name for model=fcn"):
        build_torchvision_segmenter("fcn", "NOPE")


def test_reference_seg_is_the_bright_mask() -> None:
    adapter = build_reference_seg(probabilities=True)
    assert adapter.task == "segmentation" and adapter.in_bands == 0
    assert adapter.categories == ("background", "bright") and not adapter.random_weights
    tile = torch.full((3, 40, 48), 200, dtype=torch.uint8)  # background <= 200
    tile[:, 5:9, 7:30] = 250
    tile[:, 30:40, 40:48] = 255  # touches the bottom and right edges
    tile[:, 20, 20] = 245  # the first uint8 level >= 0.96 of the range is bright
    tile[:2, 12:16, 0:10] = 250  # bright in 2 of 3 bands only: background
    tile[:, 25, 25] = 244  # one level below: background
    want = np.zeros((40, 48), np.uint8)
    want[5:9, 7:30] = 1
    want[30:40, 40:48] = 1
    want[20, 20] = 1
    four = torch.full((1, 4, 40, 48), 100, dtype=torch.uint8)
    four[:, :, 1:3, 2:5] = 250
    with torch.inference_mode():
        rec, empty = adapter.predict(torch.stack([tile, torch.zeros_like(tile)]), 48)
        (rec4,) = adapter.predict(four, 48)
    np.testing.assert_array_equal(rec.class_ids, want)
    assert rec.class_ids.dtype == np.uint8 and not empty.class_ids.any()
    assert rec.probabilities is not None
    np.testing.assert_array_equal(rec.probabilities[1], want * 255)
    np.testing.assert_array_equal(rec.probabilities[0], (1 - want) * 255)
    assert int(rec4.class_ids.sum()) == 6
    with pytest.raises(ModelError, match="weights=x.pth given for model=reference-seg"):
        build_reference_seg("x.pth")


def test_class_maps_from_logits_dtypes() -> None:
    logits = torch.zeros(2, 300, 4, 5)
    logits[0, 299, 1, 2] = 5.0
    logits[1, 7] = 1.0
    first, second = class_maps_from_logits(logits.to(torch.bfloat16), probabilities=False)
    assert first.class_ids.dtype == np.uint16 and first.class_ids[1, 2] == 299
    assert (second.class_ids == 7).all()
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        class_maps_from_logits(torch.zeros(2, 3), probabilities=False)
    with pytest.raises(ValueError, match="class_ids"):
        ClassMap(class_ids=np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="probabilities"):
        ClassMap(class_ids=np.zeros((2, 2), np.uint8), probabilities=np.zeros((3, 2, 1), np.uint8))


CUSTOM = '''
import torch

class Halves(torch.nn.Module):
    """2 classes: 1 where the first band > 0.5 (x in [0, 1]); logits in a dict as torchvision."""
    task = "segmentation"
    categories = ("dark", "light")
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
    def forward(self, x):
        light = (x[:, :1] - 0.5) * 20
        return {"out": torch.cat([-light, light], dim=1)}

class Bare(Halves):
    def forward(self, x):
        return super().forward(x)["out"]

class Undeclared(Bare):
    task = None  # as if not set: the wrapper probes

def build(weights):
    return Halves()

def build_bare(weights):
    return Bare()

def build_undeclared(weights):
    return Undeclared()
'''


@pytest.fixture
def segmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mgpr_segmod.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mgpr_segmod"


@pytest.mark.parametrize("attr", ["build", "build_bare"])
def test_custom_segmentation_module(segmod: str, attr: str) -> None:
    from mgpr.models.custom import build_custom

    adapter = build_custom(f"{segmod}:{attr}", "w", tile_size=16, probabilities=True)
    assert adapter.task == "segmentation" and adapter.categories == ("dark", "light")
    tile = torch.zeros((1, 3, 16, 16), dtype=torch.uint8)
    tile[:, 0, 4:8, :] = 255
    with torch.inference_mode():
        (rec,) = adapter.predict(tile, 16)
    want = np.zeros((16, 16), np.uint8)
    want[4:8] = 1
    np.testing.assert_array_equal(rec.class_ids, want)
    assert rec.probabilities is not None and rec.probabilities.shape == (2, 16, 16)
    assert rec.probabilities[1, 5, 0] == 255 and rec.probabilities[1, 0, 0] == 0


def test_custom_segmenter_must_declare_its_task(segmod: str) -> None:
    with pytest.raises(ModelError) as info:
        build_model(f"{segmod}:build_undeclared", tile_size=16)
    msg = str(info.value)
    assert "returns a tensor of shape (1, 2, 16, 16)" in msg and 'task = "segmentation"' in msg


def test_run_builds_a_custom_segmenter(segmod: str) -> None:
    from mgpr.run.adapter import build_adapter

    cfg = replace(PredictConfig(), tile_size=16)
    assert build_adapter(cfg, f"{segmod}:build", 0).task == "segmentation"
