"""``compile=true|false|auto``: the rule, the fallback to eager, padding, and compiled == eager.

Real ``torch.compile`` (inductor, CPU) runs on a small ResNet-like network and on the reference
detector; ResNet-50 and Faster R-CNN compile for minutes on a small CPU, so their agreement
tests are ``heavy``: skipped unless ``MGPR_HEAVY_TESTS=1`` (the GPU check script sets it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_mgpr_inprocess
from torchvision.models.resnet import BasicBlock, ResNet

from mgpr.conf.load import load_config
from mgpr.data.scaling import ValueScaler
from mgpr.errors import ConfigError
from mgpr.models import build_model
from mgpr.models.classification import ImageNetClassifierAdapter
from mgpr.models.compile import CompileOutcome, GuardedCompile, compile_adapter, pad_batch
from mgpr.run.accel import AUTO_COMPILE_MIN_BATCHES, COMPILE_MODE, resolve_compile
from mgpr.testimage import TestImageSpec, render_block

SPEC = TestImageSpec(width=1024, height=1024, objects=40, seed=3)


def _tiles(size: int, n: int) -> torch.Tensor:
    """``n`` (3, size, size) uint8 tiles of the planted-object raster."""
    per_row = SPEC.width // size
    blocks = [
        render_block(SPEC, (i // per_row) * size, (i % per_row) * size, size, size)
        for i in range(n)
    ]
    return torch.from_numpy(np.stack(blocks))


# ------------------------------------------------------------------ the rule
def test_compile_rule() -> None:
    per_rank = AUTO_COMPILE_MIN_BATCHES * 8  # tiles per rank at batch 8: exactly the threshold
    on = resolve_compile("auto", "gpu", 2 * per_rank, 2, 8)
    assert on.enabled and on.mode == COMPILE_MODE and str(AUTO_COMPILE_MIN_BATCHES) in on.reason
    short = resolve_compile("auto", "gpu", 2 * per_rank - 2 * 8, 2, 8)  # one batch fewer
    assert not short.enabled and "too short" in short.reason
    assert not resolve_compile("auto", "cpu", 10**9, 1, 1).enabled  # never on CPU
    assert resolve_compile("true", "cpu", 1, 1, 8) == resolve_compile("true", "cpu", 1, 1, 8)
    cpu_true = resolve_compile("true", "cpu", 1, 1, 8)
    assert cpu_true.enabled and cpu_true.mode is None  # inductor's default
    assert resolve_compile("true", "gpu", 1, 1, 8).mode == COMPILE_MODE
    assert not resolve_compile("false", "gpu", 10**9, 1, 1).enabled


def test_compile_key_validation() -> None:
    assert load_config(["compile=true"]).compile == "true"  # YAML bool -> the key's word
    assert load_config(["compile=False"]).compile == "false"
    assert load_config([]).compile == "auto"
    with pytest.raises(ConfigError, match=r"compile='yes'.*auto, true, false"):
        load_config(["compile=yes"])


# ------------------------------------------------------------------ fallback, padding
class _Boom(RuntimeError):
    pass


def _failing_at_first_call(module: torch.nn.Module, **kwargs: object) -> object:
    def call(*args: object) -> object:
        raise _Boom("inductor: C++ compile failed\nsecond line")

    return call


def _failing_at_compile(module: torch.nn.Module, **kwargs: object) -> object:
    raise _Boom("dynamo does not support this Python")


@pytest.mark.parametrize("compiler", [_failing_at_first_call, _failing_at_compile])
def test_compile_failure_falls_back_to_eager(compiler, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    adapter = build_model("null", "none")
    x = _tiles(64, 2)
    expected = adapter.predict(x, 64)
    with caplog.at_level(logging.WARNING):
        outcome = compile_adapter(
            adapter, requested="true", mode=None, reason="compile=true", compiler=compiler
        )
        got = adapter.predict(x, 64)
    assert outcome.used == "eager" and outcome.mode is None
    assert "torch.compile failed, running eager: _Boom: " in outcome.reason
    assert "\n" not in outcome.reason
    warnings = [r for r in caplog.records if "running eager" in r.getMessage()]
    assert len(warnings) == 1
    adapter.predict(x, 64)  # eager for good: no second warning
    assert len([r for r in caplog.records if "running eager" in r.getMessage()]) == 1
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_out_of_memory_is_not_a_compile_failure() -> None:
    def oom(*args: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory")

    outcome = CompileOutcome("true", "compiled", None, "compile=true")
    guarded = GuardedCompile(lambda x: x, oom, outcome)
    with pytest.raises(torch.OutOfMemoryError):
        guarded(1)
    assert outcome.used == "compiled"


def test_pad_batch() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 3, 4, 4) and padded.dtype == torch.uint8
    assert torch.equal(padded[:2], x) and not padded[2:].any()
    assert pad_batch(x, 2) is x
    floats = pad_batch(x.float() / 255, 3)  # float [0, 1] tiles pad the same way
    assert floats.dtype == torch.float32 and floats.shape[0] == 3


# ------------------------------------------------------------------ compiled == eager
def _small_resnet(classes: int = 16) -> ImageNetClassifierAdapter:
    """A seeded ResNet-like classifier (one BasicBlock per stage), well conditioned."""
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=classes, zero_init_residual=True)
    with torch.no_grad():
        net.fc.weight.mul_(20.0)  # spread the logits so top-1 is not a near-tie
    return ImageNetClassifierAdapter(
        net, name="small", weights_id="seed0", random_weights=True, categories=None, topk=1
    )


@pytest.mark.slow  # ~30 s of inductor code generation on 2 shared cores
def test_compiled_classifier_agrees_with_eager_top1() -> None:
    torch._dynamo.reset()
    eager = _small_resnet()
    x = _tiles(64, 6)
    with torch.inference_mode():
        ref = eager.forward(eager.prepare(ValueScaler()(x))).float()
    compiled = _small_resnet()
    outcome = compile_adapter(compiled, requested="true", mode=None, reason="test")
    with torch.inference_mode():
        got = compiled.forward(compiled.prepare(ValueScaler()(x))).float()
    assert outcome.used == "compiled", outcome.reason
    assert torch.equal(ref.argmax(1), got.argmax(1))
    assert (ref.softmax(1) - got.softmax(1)).abs().max().item() < 1e-3


def test_compile_true_run_pads_last_batch_and_matches_eager(tmp_path: Path) -> None:
    """A whole run, compile=true vs false: same boxes; 9 tiles at batch 4 compile ONE graph."""
    from torch._dynamo.utils import counters

    results = {}
    for flag in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / flag
        rc = run_mgpr_inprocess(
            f"output_dir={out}",
            "image_size=1024",
            "objects=10",
            "batch_size=4",
            "workers=0",
            "progress=false",
            f"compile={flag}",
        )
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        results[flag] = summary
        if flag == "true":
            assert summary["tiles_total"] % 4 != 0  # the last batch is short
            assert summary["compile"]["used"] == "compiled", summary["compile"]
            assert counters["stats"]["unique_graphs"] == 1
        else:
            assert summary["compile"]["used"] == "eager"
    report = json.loads((tmp_path / "true" / "report.json").read_text())
    assert report["context"]["compile"] == "compiled"
    for flag in ("false", "true"):
        check = results[flag]["demo_check"]
        assert check["found"] == check["planted"] == 10
        assert check["max_footprint_error_px"] == 0.0
    assert results["true"]["records"] == results["false"]["records"]


@pytest.mark.heavy
def test_compiled_resnet50_agrees_with_eager_top1() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model("resnet50", "none", topk=1)
    compiled = build_model("resnet50", "none", topk=1)
    compiled.module.load_state_dict(eager.module.state_dict())
    x = _tiles(64, 4)
    outcome = compile_adapter(compiled, requested="true", mode=None, reason="test")
    with torch.inference_mode():
        ref = eager.forward(eager.prepare(ValueScaler()(x))).float()
        got = compiled.forward(compiled.prepare(ValueScaler()(x))).float()
    assert outcome.used == "compiled", outcome.reason
    assert torch.equal(ref.argmax(1), got.argmax(1))


@pytest.mark.heavy
def test_compiled_fasterrcnn_boxes_agree_with_eager() -> None:
    """The seeded, well-conditioned checkpoint of the exact-box tests; backbone compiled."""
    from test_exact_boxes import MATCH_IOU, MAX_EDGE_ERROR_PX, match_boxes, seeded_fasterrcnn_state

    size = 128
    state = seeded_fasterrcnn_state(size)
    adapters = []
    for _ in range(2):
        adapter = build_model("fasterrcnn", "none", tile_size=size, score_threshold=0.0)
        adapter.module.load_state_dict(state)
        adapters.append(adapter)
    torch._dynamo.reset()
    outcome = compile_adapter(adapters[1], requested="true", mode=None, reason="test")
    x = _tiles(size, 2)
    with torch.inference_mode():
        ref = adapters[0].predict(x, size)
        got = adapters[1].predict(x, size)
    assert outcome.used == "compiled", outcome.reason
    matched = total = 0
    for a, b in zip(ref, got, strict=True):
        pairs = match_boxes(a, b, MATCH_IOU)
        total += len(a)
        matched += len(pairs)
        for i, j in pairs:
            assert np.abs(a.boxes[i] - b.boxes[j]).max() <= MAX_EDGE_ERROR_PX
    assert total > 0 and matched >= 0.95 * total
