"""A user's torchvision RetinaNet / FCOS under bf16: what mgpr's float32 box path costs.

For each detector (ResNet-50 FPN, random weights on a backbone calibrated as in
``tests/test_exact_boxes.py``, every box kept) on ``--batch`` tiles of ``--tile`` px of the
planted-object test image, three settings timed in ``--rounds`` interleaved rounds (median
seconds per batch):

* ``fp32``: torchvision's own forward, no autocast;
* ``bf16 torchvision``: its own forward under bf16 autocast (fast, boxes on a 4 px step);
* ``bf16 mgpr``: :func:`mgpr.models.detection.exact_detector_forward` under bf16 autocast (the
  backbone and the head's towers in bf16, the head's output layers and every coordinate in
  float32), what ``model=pkg.module:build`` runs.

Then the ratios to fp32 from rows of this run, the share of box edges (above 16 px) on the bf16
grid for each bf16 setting, and the bf16 mgpr vs fp32 box agreement (matched: same label,
one-to-one, IoU >= 0.9; the largest edge difference, px). Figures, not assertions.

    uv run python benchmarks/single_stage_bf16.py                # CPU, 2 x 512 px
    python3 benchmarks/single_stage_bf16.py --device cuda --tile 1024 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline import cpu_name  # noqa: E402
from test_exact_boxes import (  # noqa: E402
    SPEC,
    calibrate_resnet_backbone,
    match_boxes,
    single_stage_detector,
)

from mgpr.models.base import detections_from_dicts  # noqa: E402
from mgpr.models.detection import exact_detector_forward  # noqa: E402
from mgpr.testimage import render_block  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, bf16: bool, batches: int) -> float:
    """Seconds per call of ``fn`` (after one untimed call), under bf16 autocast or none."""
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            fn()
        sync(device)
    return (time.perf_counter() - start) / batches


def on_bf16_grid(outputs: list[dict[str, torch.Tensor]]) -> float:
    """Share of box edges above 16 px that a bf16 number holds exactly (4 px steps between 512
    and 1024 px, 2 px between 256 and 512, ...); ~0 for coordinates computed in float32."""
    x = torch.cat([o["boxes"].float().cpu().flatten() for o in outputs])
    x = x[x > 16]
    return float((x.bfloat16().float() == x).float().mean()) if x.numel() else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="retinanet,fcos")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=2, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(
        f"device: {name}; avx512_bf16: {'avx512_bf16' in flags}; amx_bf16: {'amx_bf16' in flags};"
        f" torch {torch.__version__}; {args.batch} x {args.tile} px"
    )
    tiles = [
        torch.from_numpy(render_block(SPEC, 0, i * args.tile, args.tile, args.tile))
        .float()
        .div(255)
        .to(device)
        for i in range(args.batch)
    ]
    for model_name in args.models.split(","):
        model = single_stage_detector(model_name, args.tile)
        model = calibrate_resnet_backbone(model, args.tile).to(device)
        settings: dict[str, tuple[Callable[[], Any], bool]] = {
            "fp32": (lambda m=model: m(tiles), False),
            "bf16 torchvision": (lambda m=model: m(tiles), True),
            "bf16 mgpr": (lambda m=model: exact_detector_forward(m, tiles), True),
        }
        seconds: dict[str, list[float]] = {k: [] for k in settings}
        for _ in range(args.rounds):
            for key, (fn, bf16) in settings.items():
                seconds[key].append(timed(fn, device, bf16, args.batches))
        base = statistics.median(seconds["fp32"])
        for key, values in seconds.items():
            s = statistics.median(values)
            print(f"{model_name:9s} {key:17s} {s:7.3f} s/batch  x{base / s:.2f} vs fp32")
        with torch.inference_mode():
            ref = exact_detector_forward(model, tiles)
            with torch.autocast(device.type, torch.bfloat16):
                ours = exact_detector_forward(model, tiles)
                theirs = model(tiles)
        errors, matched, total = [], 0, 0
        got, want = detections_from_dicts(ours, 0.0), detections_from_dicts(ref, 0.0)
        for a, b in zip(got, want, strict=True):
            pairs = match_boxes(a, b, 0.9)
            matched, total = matched + len(pairs), total + len(b)
            errors += [float(np.abs(a.boxes[i] - b.boxes[j]).max()) for i, j in pairs]
        step_theirs, step_ours = on_bf16_grid(theirs), on_bf16_grid(ours)
        print(
            f"{model_name:9s} edges on the bf16 grid: bf16 torchvision {step_theirs:.3f},"
            f" bf16 mgpr {step_ours:.3f}; bf16 mgpr vs fp32: {matched} of {total}"
            f" boxes matched, largest edge error {max(errors, default=float('nan')):.3f} px"
        )


if __name__ == "__main__":
    main()
