"""precision=auto picks by device; bf16 autocast agrees with fp32 within a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mgpr.run.precision as predict
from mgpr.data.scaling import ValueScaler
from mgpr.models import build_model
from mgpr.testimage import TestImageSpec, render_block

# Stated tolerance (README): top-1 class agreement >= 90 % of tiles and softmax probabilities
# within 0.05 of fp32, for resnet50 under bf16 autocast + channels_last.
TOP1_AGREEMENT_MIN = 0.9
PROB_ABS_DIFF_MAX = 0.05


def test_auto_precision_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: True)
    assert predict.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: False)
    assert predict.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    assert predict.resolve_precision("auto", "gpu") == "bf16-mixed"  # Hopper
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 0))
    assert predict.resolve_precision("auto", "gpu") == "16-mixed"  # Volta
    assert predict.resolve_precision("32", "gpu") == "32-true"
    assert predict.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    # fp16 autocast is GPU-only: Lightning runs bf16 on a CPU, so that is what mgpr reports
    assert predict.resolve_precision("16-mixed", "cpu") == "bf16-mixed"
    assert predict.resolve_precision("16-mixed", "gpu") == "16-mixed"


def test_bf16_autocast_agrees_with_fp32_resnet50() -> None:
    torch.manual_seed(0)
    adapter = build_model("resnet50", "none", topk=1)
    spec = TestImageSpec(width=1024, height=1024, seed=3)
    tiles = np.stack(
        [render_block(spec, r * 64, c * 64, 64, 64) for r in range(2) for c in range(4)]
    )
    x = torch.from_numpy(tiles)
    with torch.inference_mode():
        inputs = adapter.prepare(ValueScaler()(x))
        p32 = adapter.forward(inputs).float().softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = adapter.forward(inputs).float().softmax(1)
    agreement = (p32.argmax(1) == p16.argmax(1)).float().mean().item()
    assert agreement >= TOP1_AGREEMENT_MIN
    assert (p32 - p16).abs().max().item() <= PROB_ABS_DIFF_MAX
