"""A user's plain ``torch.nn.Module`` (``model=pkg.module:build``) in the forms users ship it.

Each case was found by a tester: a TorchScript module crashed the wrapper, a head registered
before the encoder gave the wrong band count, a softmax or sigmoid export was read as logits
(every pixel class 1, scores 1.0 -> 0.475), channels-last logits became 256 classes, and an
error inside ``build`` dumped mgpr's frames with exit 1 and an empty rank log.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_mgpr_inprocess

from mgpr.errors import ModelError
from mgpr.models import build_model

USER_MODULE = '''
import torch
from torch import nn


class Mean(nn.Module):
    """(B, 3, H, W) -> (B, 3) logits: 10 x each band's mean (the brightest band wins)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 10)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def build_mean(weights):
    return Mean()


def build_scripted(weights):
    return torch.jit.script(Mean()).eval()


def build_loaded(weights):
    torch.jit.save(torch.jit.script(Mean()), weights)
    return torch.jit.load(weights).eval()


class HeadFirst(nn.Module):
    """An RGB segmenter whose head (16 -> 2 channels) is registered before its encoder."""

    task = "segmentation"

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 2, 1)
        self.enc = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return self.head(self.enc(x))


def build_head_first(weights):
    return HeadFirst()


def build_head_first_declared(weights):
    net = HeadFirst()
    net.num_classes = 2  # no probe forward: the band count must still be 3
    return net


class NeedsFive(nn.Module):
    """Fails on any tile that does not have 5 bands, and has no Conv2d to tell."""

    task = "segmentation"

    def forward(self, x):
        return x.view(x.shape[0], 5, *x.shape[2:])[:, :2]


def build_needs_five(weights):
    return NeedsFive()


class SigmoidSeg(nn.Module):
    """One sigmoid channel: p = 0.9 on bright pixels (band 1 > 0.5), 0.2 elsewhere."""

    task = "segmentation"

    def forward(self, x):
        bright = (x[:, :1] > 0.5).float()
        return torch.sigmoid(torch.logit(torch.tensor(0.2)) + bright * 3.58)


class SoftmaxSeg(nn.Module):
    """3 classes as softmax probabilities: class 2 on bright pixels (band 1 > 0.5), else 0."""

    task = "segmentation"
    num_classes = 3  # no probe: the first batch decides

    def forward(self, x):
        bright = (x[:, :1] > 0.5).float()
        return torch.cat([1 - bright, torch.zeros_like(bright), 2 * bright], 1).mul(3).softmax(1)


class SoftmaxCls(Mean):
    """Mean's logits through a softmax, as an activation="softmax" export returns them."""

    def forward(self, x):
        return super().forward(x).softmax(1)


class ChannelsLast(nn.Module):
    """3 class logits per pixel, channels last (B, H, W, 3)."""

    task = "segmentation"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


def build_sigmoid(weights):
    return SigmoidSeg()


def build_softmax_seg(weights):
    return SoftmaxSeg()


def build_softmax_cls(weights):
    return SoftmaxCls()


def build_channels_last(weights):
    return ChannelsLast()


def build_from_checkpoint(weights):
    net = Mean()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net


def build_wrong_keys(weights):
    net = Mean()
    net.load_state_dict({"fc.weight": torch.zeros(1)})
    return net
'''


@pytest.fixture
def usermod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module above as ``mgpr_usermod`` on ``sys.path``."""
    (tmp_path / "mgpr_usermod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mgpr_usermod", raising=False)  # this test's file
    return "mgpr_usermod"


def _rgb_tiles(size: int = 16) -> torch.Tensor:
    """Two uint8 tiles: the first red, the second blue."""
    tiles = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    tiles[0, 0] = 255
    tiles[1, 2] = 255
    return tiles


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("attr", ["build_scripted", "build_loaded"])
def test_a_torchscript_module_runs(usermod: str, attr: str, tmp_path: Path) -> None:
    """``torch.jit.load(w).eval()`` crashed: requires_grad_ is not supported on ScriptModules."""
    adapter = build_model(f"{usermod}:{attr}", str(tmp_path / "m.pt"), topk=1, tile_size=16)
    assert adapter.task == "classification" and adapter.in_bands == 3
    assert not any(p.requires_grad for p in adapter.module.parameters())
    with torch.inference_mode():
        red, blue = adapter.predict(_rgb_tiles(), 16)
    assert red.class_ids.tolist() == [0] and blue.class_ids.tolist() == [2]


@pytest.mark.parametrize("attr", ["build_head_first", "build_head_first_declared"])
def test_the_first_applied_conv_gives_the_band_count(usermod: str, attr: str, caplog) -> None:
    """Not the first registered one (16 channels), which failed the probe of an RGB model."""
    import logging

    with caplog.at_level(logging.INFO):
        adapter = build_model(f"{usermod}:{attr}", tile_size=16)
    assert adapter.in_bands == 3 and adapter.categories == ("0", "1")
    assert "first registered Conv2d takes 16 channels" in caplog.text
    assert "the first its forward applies takes 3" in caplog.text


def test_a_failed_probe_names_the_in_bands_attribute(usermod: str) -> None:
    with pytest.raises(ModelError) as info:
        build_model(f"{usermod}:build_needs_five", tile_size=16)
    msg = str(info.value)
    assert "fails on a (1, 3, 16, 16) float tile" in msg and "\n" not in msg
    assert "set an `in_bands` attribute on the module" in msg
    assert "`num_classes` attribute on the module to skip this probe" in msg


def test_an_error_inside_build_is_one_line_at_the_users_line(usermod: str, tmp_path: Path) -> None:
    """Not ~60 lines of mgpr frames: the call, the exception's first line(s), the user's line."""
    with pytest.raises(ModelError) as info:
        build_model(f"{usermod}:build_wrong_keys", "w.pth", tile_size=16)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"model={usermod}:build_wrong_keys: build_wrong_keys('w.pth') raised ")
    assert "RuntimeError: Error(s) in loading state_dict for Mean: Missing key(s)" in msg
    line = USER_MODULE.splitlines().index('    net.load_state_dict({"fc.weight": torch.zeros(1)})')
    assert f"{tmp_path / 'mgpr_usermod.py'}:{line + 1};" in msg  # the user's file, not torch's
    assert "weights= was not given" not in msg


def test_build_without_weights_gets_default_and_the_run_says_so(
    usermod: str, make_image, tmp_path: Path, capsys
) -> None:
    """No weights=: build(DEFAULT) opens 'DEFAULT'; exit 2, the traceback in the rank's log."""
    image = make_image(width=32, height=32, bands=3).path
    run = tmp_path / "run"
    code = run_mgpr_inprocess(
        f"input_path={image}",
        f"model={usermod}:build_from_checkpoint",
        "workers=0",
        "accelerator=cpu",
        "progress=false",
        "tile_size=32",
        f"output_dir={run}",
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("mgpr: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "build_from_checkpoint('DEFAULT') raised FileNotFoundError" in lines[0]
    assert "weights= was not given, so build received 'DEFAULT'" in lines[0]
    assert "pass weights=/path/to/checkpoint.pth" in lines[0]
    log = (run / "logs" / "rank0.log").read_text()
    assert f"the full traceback is in {run / 'logs' / 'rank0.log'}" in lines[0]
    assert "Traceback (most recent call last)" in log and "in build_from_checkpoint" in log
    assert lines[0] in log  # the one line too


def _marked(usermod: str, attr: str, kind: str, **kwargs: object):  # noqa: ANN202
    """The adapter of ``attr`` with ``output_kind = kind`` set on its class."""
    import importlib

    module = importlib.import_module(usermod)
    cls = {"build_sigmoid": "SigmoidSeg", "build_softmax_seg": "SoftmaxSeg"}.get(attr, "SoftmaxCls")
    getattr(module, cls).output_kind = kind
    return build_model(f"{usermod}:{attr}", **kwargs)


def _bright_tiles(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 tiles with a bright block in band 1, and its mask."""
    tiles = torch.full((2, 3, size, size), 40, dtype=torch.uint8)
    tiles[0, 0, 2:6, 3:9] = 250
    tiles[1, 0, 8:, :5] = 250
    return tiles, tiles[:, 0] > 127


@pytest.mark.parametrize(
    ("attr", "needle"),
    [
        ("build_sigmoid", r"one class score per pixel, every one in a batch within \[0, 1\]"),
        ("build_softmax_seg", r"3 class scores per pixel that all lie in \[0, 1\] and sum to 1"),
    ],
)
def test_unmarked_probabilities_are_refused_at_the_first_batch(
    usermod: str, attr: str, needle: str
) -> None:
    """Read as logits they gave every pixel class 1 (sigmoid) or squashed probabilities."""
    adapter = build_model(f"{usermod}:{attr}", tile_size=16, probabilities=True)
    with torch.inference_mode(), pytest.raises(ModelError) as info:
        adapter.predict(_bright_tiles()[0], 16)
    msg = str(info.value)
    assert re.search(needle, msg) and "\n" not in msg
    assert 'set `output_kind = "probabilities"` on the module' in msg
    assert '`output_kind = "logits"` if they are logits' in msg


def test_a_softmax_classifier_is_warned_about_once(usermod: str, caplog) -> None:
    """A classifier's few rows could be real logits, and its top class is right: one warning."""
    import logging

    adapter = build_model(f"{usermod}:build_softmax_cls", topk=1, tile_size=16)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        adapter.predict(_rgb_tiles(), 16)
        adapter.predict(_rgb_tiles(), 16)
    lines = [r.getMessage() for r in caplog.records if "output_kind" in r.getMessage()]
    assert len(lines) == 1
    assert "3 class scores per tile that all lie in [0, 1] and sum to 1: softmax" in lines[0]
    assert 'set `output_kind = "probabilities"` on the module' in lines[0]


def test_marked_probabilities_are_used_as_they_are(usermod: str) -> None:
    """Threshold 0.5 for one channel, argmax for several, probabilities written unchanged."""
    tiles, bright = _bright_tiles()
    with torch.inference_mode():
        sig = _marked(usermod, "build_sigmoid", "probabilities", tile_size=16, probabilities=True)
        for m, b in zip(sig.predict(tiles, 16), bright, strict=True):
            assert (m.class_ids == b.numpy()).all()
            assert m.probabilities is not None
            p1 = m.probabilities[1].astype(int)
            assert abs(p1[b.numpy()] - 0.9 * 255).max() <= 0.5  # 0.9, not sigmoid(0.9) = 0.71
            assert abs(p1[~b.numpy()] - 0.2 * 255).max() <= 0.5
        soft = _marked(usermod, "build_softmax_seg", "probabilities", tile_size=16)
        soft.probabilities = True
        raw = soft.module(tiles.float() / 255)
        for m, b, p in zip(soft.predict(tiles, 16), bright, raw, strict=True):
            assert (m.class_ids == b.numpy() * 2).all()
            assert (m.probabilities == (p * 255).round().to(torch.uint8).numpy()).all()
        cls = _marked(usermod, "build_softmax_cls", "probabilities", topk=1, tile_size=16)
        red, blue = cls.predict(_rgb_tiles(), 16)
    assert red.class_ids.tolist() == [0] and blue.class_ids.tolist() == [2]
    assert red.scores[0] > 0.99  # not a second softmax's 0.58


def test_declared_logits_skip_the_check_and_wrong_declarations_are_refused(
    usermod: str,
) -> None:
    tiles, _ = _bright_tiles()
    with torch.inference_mode():
        logits = _marked(usermod, "build_sigmoid", "logits", tile_size=16)
        assert all(m.class_ids.all() for m in logits.predict(tiles, 16))  # as asked: p > 0
        with pytest.raises(ModelError, match=r"output_kind='maybe'; set it to 'logits'"):
            _marked(usermod, "build_sigmoid", "maybe", tile_size=16)
    import importlib

    module = importlib.import_module(usermod)
    module.ChannelsLast.output_kind = "probabilities"  # logits declared as probabilities
    module.ChannelsLast.forward = lambda self, x: self.conv(x) * 100
    adapter = build_model(f"{usermod}:build_channels_last", tile_size=16)
    with (
        torch.inference_mode(),
        pytest.raises(
            ModelError, match=r"declares output_kind = 'probabilities' but returned class scores"
        ),
    ):
        adapter.predict(tiles, 16)


def test_one_hot_logits_are_not_taken_for_probabilities(usermod: str) -> None:
    """Exactly 0 and 1 sum to 1 too, but give the same class either way: no refusal."""
    import importlib

    module = importlib.import_module(usermod)
    module.SoftmaxSeg.forward = lambda self, x: (
        torch.nn.functional.one_hot((x[:, 0] > 0.5).long() * 2, 3).permute(0, 3, 1, 2).float()
    )
    adapter = build_model(f"{usermod}:build_softmax_seg", tile_size=16)
    tiles, bright = _bright_tiles()
    with torch.inference_mode():
        maps = adapter.predict(tiles, 16)
    assert all((m.class_ids == b.numpy() * 2).all() for m, b in zip(maps, bright, strict=True))


def test_channels_last_logits_are_refused_naming_the_permute(usermod: str) -> None:
    """They became 256 'classes' on a 256 x 3 map stretched to the tile, with exit 0."""
    with pytest.raises(ModelError) as info:
        build_model(f"{usermod}:build_channels_last", tile_size=16)
    msg = str(info.value)
    assert "shape (1, 16, 16, 3) for 16 x 16 px tiles" in msg and "(16 x 3)" in msg
    assert "channels-first (B, classes, H, W)" in msg and "out.permute(0, 3, 1, 2)" in msg
    import importlib

    importlib.import_module(usermod).ChannelsLast.categories = ("a", "b", "c")  # no probe
    adapter = build_model(f"{usermod}:build_channels_last", tile_size=16)
    with torch.inference_mode(), pytest.raises(ModelError, match=r"out\.permute\(0, 3, 1, 2\)"):
        adapter.predict(_rgb_tiles(), 16)


def test_marked_probabilities_under_tta_give_the_same_map(usermod: str) -> None:
    """tta averages the module's own probabilities (no sigmoid of them), as one view does."""
    from mgpr.models.tta import VIEWS, augmented_forward

    adapter = _marked(usermod, "build_sigmoid", "probabilities", tile_size=16, probabilities=True)
    tiles, bright = _bright_tiles()
    x = tiles.float() / 255
    with torch.inference_mode():
        plain = adapter.postprocess(adapter.forward(x), 16)
        flips = adapter.postprocess(augmented_forward(adapter, x, VIEWS["flips"]), 16)
    for one, four, b in zip(plain, flips, bright, strict=True):
        assert (four.class_ids == b.numpy()).all() and (one.class_ids == four.class_ids).all()
        assert abs(four.probabilities.astype(int) - one.probabilities.astype(int)).max() <= 1


def test_the_readme_example_normalises_as_imagenet_models_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's custom module: the wrapped ResNet-18 sees ImageNet-normalised input."""
    import torchvision

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "ImageNetNormalised" in b)
    (tmp_path / "my_models.py").write_text(textwrap.dedent(block.split("```")[0]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "landcover.pth")
    adapter = build_model("my_models:build", str(tmp_path / "landcover.pth"), topk=10)
    assert adapter.task == "classification" and adapter.in_bands == 3
    assert adapter.categories is not None and len(adapter.categories) == 10
    tiles = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = tiles.float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = net((x - mean) / std).softmax(1)
        got = adapter.predict(tiles, 32)
    for rec, row in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(rec.scores), row[rec.class_ids])


@pytest.mark.parametrize(("input_range", "needle"), [(None, "tiles in [0, 1]"), ("raw", "native")])
def test_the_log_says_a_module_gets_no_normalisation(
    usermod: str, input_range: str | None, needle: str, caplog
) -> None:
    import importlib
    import logging

    if input_range is not None:
        importlib.import_module(usermod).Mean.input_range = input_range
    with caplog.at_level(logging.INFO):
        build_model(f"{usermod}:build_mean", tile_size=16)
    lines = [r.getMessage() for r in caplog.records if "no normalisation" in r.getMessage()]
    assert lines and needle in lines[-1] and "no ImageNet mean/std" in lines[-1]
