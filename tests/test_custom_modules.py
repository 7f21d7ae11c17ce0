"""A user's plain ``torch.nn.Module`` (``model=pkg.module:build``) in the forms users ship it.

Each case was found by a tester: a TorchScript module crashed the wrapper, a head registered
before the encoder gave the wrong band count, a softmax or sigmoid export was read as logits
(every pixel class 1, scores 1.0 -> 0.475), channels-last logits became 256 classes, and an
error inside ``build`` dumped mgpr's frames with exit 1 and an empty rank log.
"""

from __future__ import annotations

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
