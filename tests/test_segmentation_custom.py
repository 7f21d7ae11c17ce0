"""A user's segmenter in every output form it may take, written right or refused in one line.

Users bring binary models with one sigmoid logit, models with a stride-4 decoder, models that do
their own argmax, fine-tuned heads without names and 256+ classes. Before, those gave an all-0
class map, a crash blamed on the disk, a refusal, no probability file, or class ids wrapped into
uint8 (300 -> 44, 255 -> nodata), each with exit 0 except the crash.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_mgpr_inprocess, segmentation_args

from mgpr.errors import ModelError
from mgpr.models.base import ClassMap, ModelAdapter, check_class_maps, class_maps_from_logits
from mgpr.models.custom import ModuleAdapter


class Bright(torch.nn.Module):
    """Bright (every band >= 245 of 255) pixels in one of several output forms."""

    task = "segmentation"

    def __init__(self, form: str, k: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.form, self.k, self.stride, self.calls = form, k, stride, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self.calls += 1
        bright = (torch.round(x * 255) >= 245).all(dim=1, keepdim=True).float()
        if self.stride > 1:
            bright = bright[..., :: self.stride, :: self.stride]
        if self.form == "ids":
            return bright[:, 0].to(torch.int64)
        if self.form == "binary":
            return bright * 8 - 4  # one logit, > 0 where bright
        logits = torch.zeros(x.shape[0], self.k, *bright.shape[2:])
        logits[:, 0] = 1 - bright[:, 0]
        logits[:, self.k - 1] = 2 * bright[:, 0]
        return {"out": logits}


def _adapter(module: torch.nn.Module, tile: int = 32, probabilities: bool = False) -> ModuleAdapter:
    return ModuleAdapter(
        module,
        name="user:seg",
        weights="w",
        topk=1,
        score_threshold=0.05,
        tile_size=tile,
        probabilities=probabilities,
    )


def _tiles(tile: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Two scaled tiles with bright blocks, and their bright mask."""
    x = torch.full((2, 3, tile, tile), 100 / 255)
    x[0, :, 4:12, 8:20] = 1.0
    x[1, :, 16:, :10] = 250 / 255
    x[1, 1, 20, 2] = 0.5  # one band dark: not bright
    mask = (torch.round(x * 255) >= 245).all(dim=1).numpy()
    return x, mask


def _maps(adapter: ModuleAdapter, x: torch.Tensor) -> list[ClassMap]:
    with torch.inference_mode():
        return list(adapter.postprocess(adapter.forward(adapter.prepare(x)), x.shape[-1]))


def test_unnamed_logits_get_numbered_classes_from_one_probe() -> None:
    module = Bright("logits", k=3)
    adapter = _adapter(module)
    assert adapter.categories == ("0", "1", "2") and module.calls == 1
    x, mask = _tiles()
    assert all(
        np.array_equal(m.class_ids, np.where(b, 2, 0))
        for m, b in zip(_maps(adapter, x), mask, strict=True)
    )


def test_num_classes_attribute_sizes_the_map_without_a_probe() -> None:
    module = Bright("ids")
    module.num_classes = 2
    adapter = _adapter(module)
    assert adapter.categories == ("0", "1") and module.calls == 0
    x, mask = _tiles()
    assert all(
        np.array_equal(m.class_ids, b.astype(np.uint8))
        for m, b in zip(_maps(adapter, x), mask, strict=True)
    )


def test_one_logit_is_a_binary_model_with_both_probabilities() -> None:
    module = Bright("binary")
    module.categories = ["building"]
    adapter = _adapter(module, probabilities=True)
    assert adapter.categories == ("background", "building")
    x, mask = _tiles()
    for m, bright in zip(_maps(adapter, x), mask, strict=True):
        assert np.array_equal(m.class_ids, bright.astype(np.uint8))
        assert m.probabilities is not None and m.probabilities.shape == (2, 32, 32)
        p = 1 / (1 + np.exp(-4.0))  # sigmoid of the +-4 logit
        assert np.all(m.probabilities[1][bright] == round(p * 255))
        assert np.all(m.probabilities[0][~bright] == round(p * 255))


def test_coarse_logits_are_resized_to_the_tile_and_coarse_ids_by_nearest() -> None:
    x, _ = _tiles()
    logits = _adapter(Bright("logits", stride=4))
    maps = _maps(logits, x)
    with torch.inference_mode():
        coarse = Bright("logits", stride=4)(x)["out"]
    up = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    assert maps[0].shape == (32, 32)
    assert np.array_equal(maps[0].class_ids, up.argmax(dim=1)[0].numpy().astype(np.uint8))
    ids_module = Bright("ids", stride=4)
    ids_module.num_classes = 2
    (first, _second) = _maps(_adapter(ids_module), x)
    assert first.shape == (32, 32)
    assert np.array_equal(first.class_ids, np.kron(ids_module(x)[0].numpy(), np.ones((4, 4))))


def test_class_ids_without_a_count_or_with_probabilities_are_refused() -> None:
    with pytest.raises(ModelError, match=r"returns class ids .* set `num_classes`"):
        _adapter(Bright("ids"))
    module = Bright("ids")
    module.num_classes = 2
    with pytest.raises(ModelError, match=r"carry no class probabilities.*seam=crop"):
        _maps(_adapter(module, probabilities=True), _tiles()[0])


def test_channels_that_do_not_match_the_categories_are_refused() -> None:
    module = Bright("logits", k=3)
    module.categories = ["ground", "roof"]
    with pytest.raises(ModelError, match=r"returned 3 class channel\(s\) but names 2 categories"):
        _maps(_adapter(module), _tiles()[0])


def test_a_segmentation_adapter_must_name_its_classes() -> None:
    class NoNames(ModelAdapter):
        def prepare(self, images):  # type: ignore[no-untyped-def]
            return images

        def postprocess(self, raw, tile_size):  # type: ignore[no-untyped-def]
            return class_maps_from_logits(raw, False)

    with pytest.raises(ModelError, match=r"segmentation model without categories"):
        NoNames(
            name="mine",
            task="segmentation",
            categories=None,
            in_bands=3,
            random_weights=False,
            weights_id="w",
            module=torch.nn.Identity(),
        )


def test_maps_off_the_tile_grid_or_past_the_classes_are_refused() -> None:
    ok = ClassMap(class_ids=np.ones((8, 8), np.uint8))
    check_class_maps([ok], 2, 8, "m")
    with pytest.raises(ModelError, match=r"returned class id 1 but has 1 categories"):
        check_class_maps([ok], 1, 8, "m")
    with pytest.raises(ModelError, match=r"returned a 8 x 8 class map for a 16 x 16 px tile"):
        check_class_maps([ok], 2, 16, "m")
    wide = ClassMap(class_ids=np.full((8, 8), 300, np.uint16))
    with pytest.raises(ModelError, match=r"class id 300 but has 256 categories"):
        check_class_maps([wide], 256, 8, "m")


USER_MODELS = """
import torch


class Bright(torch.nn.Module):
    task = "segmentation"

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        bright = (torch.round(x * 255) >= 245).all(dim=1, keepdim=True).float()
        if self.k == 1:
            return bright * 8 - 4
        logits = torch.zeros(x.shape[0], self.k, *x.shape[2:])
        logits[:, 0] = 1 - bright[:, 0]
        logits[:, self.k - 1] = 2 * bright[:, 0]
        return logits


def binary(weights):
    return Bright(1)


def k256(weights):
    return Bright(256)
"""


def _run(image: Path, run: Path, model: str, *more: str) -> int:
    return run_mgpr_inprocess(*segmentation_args(image, run, *more, model=model))


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mgpr_user_seg.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mgpr_user_seg"


def _truth(image: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(image) as src:
        bright = (src.read() >= 245).all(axis=0)
        invalid = src.dataset_mask() == 0
    return bright, invalid


@pytest.mark.slow
def test_binary_logit_model_writes_its_class_map_and_both_probabilities(
    make_image, tmp_path: Path, user_models: str
) -> None:
    img = make_image(width=300, height=260, objects=5, nodata="border")
    run = tmp_path / "run"
    assert _run(img.path, run, f"{user_models}:binary", "probabilities=true") == 0
    bright, invalid = _truth(img.path)
    with rasterio.open(run / "segmentation" / "ortho.tif") as out:
        ids = out.read(1)
        assert out.dtypes[0] == "uint8" and out.nodata == 255
    want = np.where(bright, 1, 0).astype(np.uint8)
    want[invalid] = 255
    assert np.array_equal(ids, want) and (ids == 1).sum() > 50
    with rasterio.open(run / "segmentation" / "ortho_prob.tif") as prob:
        assert prob.count == 2 and prob.descriptions == ("0", "1")
        p = prob.read()
    assert np.all(p[1][bright & ~invalid] == 250) and np.all(p[0][bright & ~invalid] == 5)


@pytest.mark.slow
def test_256_unnamed_classes_keep_class_255_apart_from_nodata(
    make_image, tmp_path: Path, user_models: str
) -> None:
    img = make_image(width=260, height=200, objects=4, nodata="border")
    run = tmp_path / "run"
    assert _run(img.path, run, f"{user_models}:k256", "batch_size=2") == 0
    bright, invalid = _truth(img.path)
    with rasterio.open(run / "segmentation" / "ortho.tif") as out:
        ids = out.read(1)
        assert out.dtypes[0] == "uint16" and out.nodata == 65535
    want = np.where(bright, 255, 0).astype(np.uint16)
    want[invalid] = 65535
    assert np.array_equal(ids, want) and (ids == 255).sum() > 50
