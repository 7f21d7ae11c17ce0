"""Tests of mgpr.models: registry, adapters, checkpoints, custom import paths (CPU, no network)."""

from __future__ import annotations

import ast
import hashlib
import os
import textwrap
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import ResNet50_Weights, resnet18
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

import mgpr.models.weights as weights_mod
from mgpr.data.scaling import ValueScaler
from mgpr.errors import ConfigError, MgprError, ModelError
from mgpr.models import (
    KNOWN_MODELS,
    Classification,
    Detections,
    ModelAdapter,
    build_model,
    is_import_path,
    weights_cache_file,
)
from mgpr.models.null import NullAdapter

MODELS_DIR = Path(__file__).resolve().parents[1] / "mgpr" / "models"


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


@pytest.fixture(scope="module")
def fasterrcnn_native() -> ModelAdapter:
    """Built once per module: a fasterrcnn takes seconds to build on a shared CPU."""
    return build_model("fasterrcnn", "none", tile_size=128, native_resolution=True)


@pytest.fixture(scope="module")
def resnet_none() -> ModelAdapter:
    """A weights=none resnet50, shared (read-only) by the checkpoint tests."""
    return build_model("resnet50", "none")


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory: pytest.TempPathFactory, resnet_none: ModelAdapter) -> Path:
    """The state_dict of ``resnet_none``, saved once (about 100 MB)."""
    path = tmp_path_factory.mktemp("ckpt") / "r50.pth"
    torch.save(resnet_none.module.state_dict(), path)
    return path


def _tiles(b: int = 2, c: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------- registry


def test_known_models_and_import_paths() -> None:
    assert KNOWN_MODELS == (
        "resnet50",
        "resnet50-embed",
        "fasterrcnn",
        "maskrcnn",
        "reference",
        "deeplabv3",
        "fcn",
        "lraspp",
        "reference-seg",
        "null",
    )
    assert not is_import_path("resnet50")
    assert is_import_path("pkg.mod:build")
    assert is_import_path("pkg.mod.build")
    assert not is_import_path("resnet")


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet5")
    msg = str(info.value)
    assert "model=resnet5" in msg and "did you mean model=resnet50" in msg
    assert all(name in msg for name in KNOWN_MODELS)
    assert "\n" not in msg


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="topk=0"):
        build_model("null", topk=0)
    with pytest.raises(ConfigError, match="score_threshold=1.5"):
        build_model("null", score_threshold=1.5)


def test_models_package_does_not_import_lightning() -> None:
    for path in MODELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), (
                path
            )


# ---------------------------------------------------------------- resnet50


def test_resnet50_random_weights_topk() -> None:
    adapter = build_model("resnet50", "none", topk=5)
    assert (adapter.task, adapter.in_bands, adapter.random_weights) == ("classification", 3, True)
    assert adapter.weights_id == "none"
    # Decision: ImageNet names for any 1000-class head, so the output schema matches a real run.
    assert adapter.categories == tuple(ResNet50_Weights.DEFAULT.meta["categories"])
    images = _tiles()
    with torch.inference_mode():
        x = adapter.prepare(ValueScaler()(images))
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(x, (images.float() / 255 - mean) / std)
        out = adapter.postprocess(adapter.forward(x), 64)
    assert len(out) == 2
    for rec in out:
        assert isinstance(rec, Classification)
        assert rec.class_ids.shape == (5,) and rec.class_ids.dtype == np.int64
        assert rec.scores.dtype == np.float32
        assert np.all(np.diff(rec.scores) <= 0) and 0 < rec.scores.sum() <= 1 + 1e-6
        assert rec.class_ids.max() < 1000


def test_resnet50_weights_names_resolve_without_download() -> None:
    spec_ids = {
        weights_mod.resolve_weights("resnet50", w).weights_id
        for w in ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "imagenet1k_v2")
    }
    assert spec_ids == {"ResNet50_Weights.IMAGENET1K_V2"}
    assert weights_mod.resolve_weights("resnet50", "IMAGENET1K_V1").weights_id == (
        "ResNet50_Weights.IMAGENET1K_V1"
    )
    with pytest.raises(ModelError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        build_model("resnet50", "IMAGENET1K_V9")


def test_checkpoint_round_trip(resnet_none: ModelAdapter, resnet_ckpt: Path) -> None:
    src, ckpt = resnet_none, resnet_ckpt
    loaded = build_model("resnet50", str(ckpt))
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert loaded.weights_id == f"file:{ckpt.resolve()}#sha256:{digest}"
    assert not loaded.random_weights
    assert loaded.categories is not None and len(loaded.categories) == 1000
    images = _tiles(seed=1)
    with torch.inference_mode():
        a, b = src.predict(images, 64), loaded.predict(images, 64)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.class_ids, rb.class_ids)
        np.testing.assert_array_equal(ra.scores, rb.scores)


def test_lightning_style_checkpoint_with_prefix_and_other_head(
    tmp_path: Path, resnet_none: ModelAdapter
) -> None:
    state = dict(resnet_none.module.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(10, 2048), torch.randn(10)  # 10 classes
    ckpt = tmp_path / "finetuned.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in state.items()}}, ckpt)
    adapter = build_model("resnet50", str(ckpt), topk=3)
    assert adapter.categories == tuple(str(i) for i in range(10))  # 10 classes: not ImageNet
    with torch.inference_mode():
        (rec,) = adapter.predict(_tiles(b=1), 64)
    assert rec.class_ids.shape == (3,) and rec.class_ids.max() < 10


def test_mismatched_checkpoint_names_keys(tmp_path: Path, resnet_none: ModelAdapter) -> None:
    ckpt = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), ckpt)
    with pytest.raises(ModelError) as info:
        build_model("resnet50", str(ckpt))
    msg = str(info.value)
    assert f"weights={ckpt}" in msg and "model=resnet50" in msg
    assert "missing: layer1.0.conv3.weight" in msg  # first missing key of resnet50's bottleneck
    assert "shape mismatch" in msg and "layer1.0.conv1.weight" in msg
    looks = "it looks like a ResNet-18 (2-2-2-2 basic blocks) checkpoint and model=resnet50 is a "
    assert looks + "ResNet-50 (3-4-6-3 bottleneck blocks)" in msg
    assert "own builder of that network, model=pkg.module:build" in msg
    assert "weights=DEFAULT" not in msg

    truncated = tmp_path / "truncated.pth"
    sd = resnet_none.module.state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, truncated)
    with pytest.raises(ModelError, match=r"missing: layer4\.0\.conv1\.weight.*only part of"):
        build_model("resnet50", str(truncated))


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(ModelError) as info:
        build_model("resnet50", str(missing))
    assert f"weights={missing}" in str(info.value) and "no such checkpoint" in str(info.value)


def test_default_weights_read_from_cache(
    torch_home: Path, resnet_none: ModelAdapter, resnet_ckpt: Path
) -> None:
    """A file in the torch hub cache is used as is: no download, the enum name as weights_id."""
    src = resnet_none
    cached = weights_cache_file("resnet50", "DEFAULT")
    assert cached == torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    os.symlink(resnet_ckpt, cached)
    adapter = build_model("resnet50", "DEFAULT")  # the fixture makes any download fail
    assert adapter.weights_id == "ResNet50_Weights.IMAGENET1K_V2" and not adapter.random_weights
    images = _tiles(seed=2)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            src.predict(images, 64)[0].scores, adapter.predict(images, 64)[0].scores
        )


def test_corrupt_cached_file_is_reported() -> None:
    cached = weights_cache_file("resnet50", "IMAGENET1K_V1")
    assert cached is not None
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    with pytest.raises(ModelError) as info:
        build_model("resnet50", "IMAGENET1K_V1")
    msg = str(info.value)
    assert f"the cached file {cached} cannot be loaded" in msg
    assert "delete it and run `mgpr-fetch-weights resnet50 --weights IMAGENET1K_V1`" in msg


@pytest.mark.parametrize("name", ["resnet50", "fasterrcnn"])
def test_offline_download_error(name: str, torch_home: Path) -> None:
    with pytest.raises(ModelError) as info:
        build_model(name, "DEFAULT")
    msg = str(info.value)
    assert msg.startswith(f"weights=DEFAULT for {name} are not in the cache")
    assert str(torch_home / "hub" / "checkpoints") in msg
    assert "network disabled in tests" in msg
    assert f"`mgpr-fetch-weights {name}`" in msg and f"TORCH_HOME={torch_home}" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- fasterrcnn


def test_fasterrcnn_native_resolution(fasterrcnn_native: ModelAdapter) -> None:
    adapter = fasterrcnn_native
    assert adapter.task == "detection" and adapter.random_weights and adapter.in_bands == 3
    assert adapter.categories == tuple(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
    transform = adapter.module.transform  # type: ignore[union-attr]
    assert tuple(transform.min_size) == (128,) and transform.max_size == 128
    with torch.inference_mode():
        inputs = adapter.prepare(ValueScaler()(_tiles(b=1, size=128)))
        assert inputs[0].dtype == torch.float32 and float(inputs[0].max()) <= 1.0
        (det,) = adapter.postprocess(adapter.forward(inputs), 128)
    assert isinstance(det, Detections)
    n = len(det)
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (n,) and det.scores.dtype == np.float32
    assert det.labels.shape == (n,) and det.labels.dtype == np.int64
    assert np.all(det.scores >= 0.05)
    assert np.all(det.boxes >= 0) and np.all(det.boxes <= 128)


def test_fasterrcnn_default_resize_keeps_torchvision_800() -> None:
    adapter = build_model("fasterrcnn", "none", native_resolution=False, score_threshold=0.5)
    transform = adapter.module.transform  # type: ignore[union-attr]
    assert tuple(transform.min_size) == (800,) and transform.max_size == 1333
    assert adapter.module.roi_heads.score_thresh == 0.5  # type: ignore[union-attr]


# ---------------------------------------------------------------- reference and null


def test_reference_detector_exact_boxes() -> None:
    adapter = build_model("reference")
    assert adapter.task == "detection" and adapter.in_bands == 0 and not adapter.random_weights
    assert adapter.categories == ("background", "bright_rectangle")
    assert len(list(adapter.module.buffers())) == 1
    tile = torch.full((3, 64, 64), 200, dtype=torch.uint8)  # background <= 200
    tile[:, 10:20, 5:15] = 250  # rows 10..19, cols 5..14
    tile[:, 50:64, 40:64] = 255  # touches the bottom and right edges
    tile[:, 30, 30:32] = 250  # 2 px: dropped (< 4 px)
    tile[:2, 30:40, 50:60] = 250  # bright in 2 of 3 bands only: not a detection
    diag = torch.full((3, 64, 64), 0, dtype=torch.uint8)
    diag[:, 0:2, 0:2] = 250
    diag[:, 2:4, 2:4] = 250  # touches the first square only at a corner: 4-connectivity keeps 2
    empty = torch.zeros((3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        out = adapter.predict(torch.stack([tile, diag, empty]), 64)
    np.testing.assert_array_equal(out[0].boxes, [[5, 10, 15, 20], [40, 50, 64, 64]])
    np.testing.assert_array_equal(out[0].scores, [1.0, 1.0])
    np.testing.assert_array_equal(out[0].labels, [1, 1])
    np.testing.assert_array_equal(out[1].boxes, [[0, 0, 2, 2], [2, 2, 4, 4]])
    assert len(out[2]) == 0 and out[2].boxes.shape == (0, 4) and out[2].boxes.dtype == np.float32


def test_reference_any_band_count_and_no_weights() -> None:
    adapter = build_model("reference", "DEFAULT")
    four = torch.full((1, 4, 16, 16), 100, dtype=torch.uint8)
    four[:, :, 2:6, 3:9] = 250
    with torch.inference_mode():
        (det,) = adapter.predict(four, 16)
    np.testing.assert_array_equal(det.boxes, [[3, 2, 9, 6]])
    with pytest.raises(ModelError, match="weights=x.pth given for model=reference"):
        build_model("reference", "x.pth")


def test_null_model_mean_brightness() -> None:
    adapter = build_model("null", "none")
    assert adapter.task == "classification" and adapter.categories == ("mean_brightness",)
    assert adapter.in_bands == 0 and adapter.weights_id == "none"
    images = _tiles(b=3, c=2, size=32)
    with torch.inference_mode():
        out = adapter.predict(images, 32)
    expected = images[:, :, ::8, ::8].double().mean(dim=(1, 2, 3)).numpy() / 255  # 1-in-64 grid
    for rec, want in zip(out, expected, strict=True):
        assert rec.class_ids.tolist() == [0] and rec.scores.dtype == np.float32
        assert rec.scores[0] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- custom import paths


CUSTOM_MODULE = '''
import torch
from mgpr.models.null import NullAdapter

class MeanLogits(torch.nn.Module):
    """(B, 3, H, W) float in [0, 1] -> (B, 3) logits [10*mean, 10*(1-mean), -1]."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([10 * m, 10 * (1 - m), torch.full_like(m, -1.0)], dim=1)

class Boxes(torch.nn.Module):
    task = "detection"
    categories = ("bg", "thing")
    def forward(self, x):
        one = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0]])
        return [{"boxes": one, "scores": torch.tensor([0.9, 0.01]),
                 "labels": torch.tensor([1, 1])} for _ in range(x.shape[0])]

class OneLogit(torch.nn.Module):
    """A binary classifier: one logit, 8 * (mean - 0.5) (positive on bright tiles)."""
    categories = ("tree",)
    def forward(self, x):
        return 8 * (x.mean(dim=(1, 2, 3)) - 0.5)[:, None]

def build(weights):
    return MeanLogits()

def build_binary(weights):
    return OneLogit()

class HalfConv(torch.nn.Module):
    """A classifier built in half precision, as a user may ship it: conv weights float16."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()
    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))

def build_half(weights):
    return HalfConv().half()

def build_det(weights):
    return Boxes()

class BoxesAs(torch.nn.Module):
    """Detections as numpy arrays, or as (x, y, w, h) boxes (x2 < x1 once read as corners)."""
    task = "detection"
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
    def forward(self, x):
        import numpy as np
        if self.kind == "numpy":
            box, score, label = np.array([[1.0, 2.0, 5.0, 6.0]]), np.array([0.9]), np.array([1])
        elif self.kind == "unit":  # normalised (0..1 of the tile), as DETR/YOLO exports give
            box = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.4, 0.9]])
            score, label = torch.tensor([0.9, 0.8]), torch.tensor([1, 1])
        elif self.kind == "resized":  # boxes on an 800 px resize of a 64 px tile: most outside
            box = torch.tensor([[10.0, 10.0, 40.0, 40.0], [300.0, 420.0, 380.0, 500.0]])
            score, label = torch.tensor([0.9, 0.8]), torch.tensor([1, 1])
        else:
            box = torch.tensor([[6.0, 6.0, 2.0, 3.0]])
            score, label = torch.tensor([0.9]), torch.tensor([1])
        return [{"boxes": box, "scores": score, "labels": label} for _ in range(x.shape[0])]

def build_det_numpy(weights):
    return BoxesAs("numpy")

def build_det_xywh(weights):
    return BoxesAs("xywh")

def build_det_unit(weights):
    return BoxesAs("unit")

def build_det_resized(weights):
    return BoxesAs("resized")

def build_adapter(weights):
    return NullAdapter()

def build_bad(weights):
    return 42

def build_no_args():
    return MeanLogits()

def build_bad_output(weights):
    return torch.nn.Identity()

CONSTANT = 3
'''


@pytest.fixture
def tmpmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mgpr_tmpmod.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    (tmp_path / "mgpr_brokenmod.py").write_text("import mgpr_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mgpr_tmpmod"


def test_custom_module_classification(tmpmod: str) -> None:
    adapter = build_model(f"{tmpmod}:build", "my-weights", topk=2, tile_size=32)
    assert adapter.name == f"{tmpmod}:build" and adapter.task == "classification"
    assert adapter.in_bands == 3 and adapter.weights_id == "my-weights"
    assert adapter.categories is None and not adapter.random_weights
    bright = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    dark = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        out = adapter.predict(torch.cat([bright, dark]), 32)
    assert [r.class_ids.tolist() for r in out] == [[0, 1], [1, 0]]  # inputs scaled to [0, 1]
    assert all(r.scores.shape == (2,) for r in out)


def test_a_module_built_in_half_precision_runs_from_float32(tmpmod: str, caplog) -> None:
    """.half() modules failed at the first forward (float32 tiles vs float16 weights)."""
    import logging

    with caplog.at_level(logging.INFO):
        adapter = build_model(f"{tmpmod}:build_half", topk=3, tile_size=8)
    assert {p.dtype for p in adapter.module.parameters()} == {torch.float32}
    assert "tensors are float16 -> float32" in caplog.text
    tiles = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    tiles[0, 2] = 255  # blue tile: class 2 highest
    tiles[1, 0] = 255  # red tile: class 0
    with torch.inference_mode():
        blue, red = adapter.predict(tiles, 8)
    assert blue.class_ids[0] == 2 and red.class_ids[0] == 0


def test_custom_one_logit_classifier_is_binary(tmpmod: str) -> None:
    """One logit is sigmoid: tree (id 1) on bright tiles, background on dark, p and 1 - p."""
    adapter = build_model(f"{tmpmod}:build_binary", topk=5, tile_size=16)
    assert adapter.task == "classification" and adapter.categories == ("background", "tree")
    bright = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    dark = torch.zeros((1, 3, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        up, down = adapter.predict(torch.cat([bright, dark]), 16)
    p = 1 / (1 + np.exp(-4.0))
    assert up.class_ids.tolist() == [1, 0] and down.class_ids.tolist() == [0, 1]
    np.testing.assert_allclose(up.scores, [p, 1 - p], atol=1e-6)
    np.testing.assert_allclose(down.scores, [p, 1 - p], atol=1e-6)


def test_custom_module_detection_and_dotted_path(tmpmod: str) -> None:
    adapter = build_model(f"{tmpmod}.build_det", score_threshold=0.5)
    assert adapter.task == "detection" and adapter.categories == ("bg", "thing")
    with torch.inference_mode():
        (det,) = adapter.predict(torch.zeros((1, 3, 8, 8), dtype=torch.uint8), 8)
    np.testing.assert_array_equal(det.boxes, [[1, 2, 5, 6]])
    assert det.labels.dtype == np.int64


def test_custom_detector_numpy_output_and_xywh_boxes(tmpmod: str) -> None:
    tile = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    with torch.inference_mode():
        (det,) = build_model(f"{tmpmod}:build_det_numpy").predict(tile, 8)
        np.testing.assert_array_equal(det.boxes, [[1, 2, 5, 6]])
        xywh = build_model(f"{tmpmod}:build_det_xywh")
        with pytest.raises(
            ModelError, match=r"box \[6.0, 6.0, 2.0, 3.0\] .* x2 < x1 .*box_convert"
        ):
            xywh.predict(tile, 8)


def test_custom_detector_boxes_in_another_frame(tmpmod: str, caplog) -> None:
    """Normalised boxes (every one within the tile's first pixel) are refused; boxes wholly
    outside the tile (a module that resized its input) are dropped with one warning."""
    import logging

    tile = torch.zeros((1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        with pytest.raises(ModelError, match=r"2 boxes .* within 0\.\.1 .* multiply x by .*64 px"):
            build_model(f"{tmpmod}:build_det_unit").predict(tile, 64)
        resized = build_model(f"{tmpmod}:build_det_resized")
        with caplog.at_level(logging.WARNING):
            (det,) = resized.predict(tile, 64)
            resized.predict(tile, 64)
    np.testing.assert_array_equal(det.boxes, [[10, 10, 40, 40], [300, 420, 380, 500]])
    lines = [r.getMessage() for r in caplog.records if "wholly outside" in r.getMessage()]
    assert len(lines) == 1 and "1 box(es) wholly outside its 64 px tile" in lines[0]
    assert "[300.0, 420.0, 380.0, 500.0]" in lines[0]


def test_custom_returning_adapter_is_used_as_is(tmpmod: str) -> None:
    assert isinstance(build_model(f"{tmpmod}:build_adapter"), NullAdapter)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("mgpr_no_such_module_xyz:build", "module 'mgpr_no_such_module_xyz' does not import"),
        ("mgpr_brokenmod:build", "No module named 'mgpr_no_such_dependency'"),
        ("mgpr_tmpmod:missing", "has no attribute 'missing'"),
        ("mgpr_tmpmod:CONSTANT", "is a int, not callable"),
        ("mgpr_tmpmod:build_bad", "returned a int"),
        ("mgpr_tmpmod:build_bad_output", "returns a tensor of shape (1, 3, 16, 16)"),
        ("mgpr_tmpmod:build_no_args", "cannot be called as build(weights): its signature is"),
    ],
)
def test_custom_errors(tmpmod: str, path: str, needle: str) -> None:
    with pytest.raises(ModelError) as info:
        build_model(path, tile_size=16)
    msg = str(info.value)
    assert needle in msg and f"model={path}" in msg and "\n" not in msg
    assert isinstance(info.value, MgprError)


def test_nonfinite_tiles_flags_nan_outputs_per_tile() -> None:
    from mgpr.models.base import nonfinite_tiles as on_device

    def nonfinite_tiles(raw, n):  # noqa: ANN001, ANN202 - the flags as the host reads them
        flags = on_device(raw, n)
        return None if flags is None else flags.cpu().numpy()

    logits = torch.zeros((3, 4))
    logits[1, 2] = float("nan")
    logits[2, 0] = float("-inf")  # a masked class: not broken
    assert nonfinite_tiles(logits, 3).tolist() == [False, True, False]
    assert nonfinite_tiles(logits, 1).tolist() == [False]  # padded rows past n are ignored
    seg = torch.zeros((2, 2, 4, 4))
    seg[0, 1, 3, 3] = float("nan")
    assert nonfinite_tiles({"out": seg}, 2).tolist() == [True, False]
    good = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "scores": torch.tensor([0.5])}
    inf_box = {"boxes": torch.tensor([[0.0, 0.0, float("inf"), 2.0]]), "scores": torch.ones(1)}
    nan_score = {"boxes": torch.zeros((0, 4)), "scores": torch.tensor([float("nan")])}
    assert nonfinite_tiles([good, inf_box, nan_score], 3).tolist() == [False, True, True]
    assert nonfinite_tiles(torch.zeros((2, 3), dtype=torch.int64), 2) is None
    assert nonfinite_tiles(object(), 2) is None


def test_random_weights_are_one_network_on_every_rank_and_run() -> None:
    """weights=none builds the same network each time (each rank builds its own; a resume
    builds it again), and leaves the caller's random stream alone."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_model("lraspp", "none").module.state_dict()
    torch.manual_seed(7)
    second = build_model("lraspp", "none").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(123)
    build_model("resnet50", "none")
    torch.testing.assert_close(torch.rand(3), expected_next)
