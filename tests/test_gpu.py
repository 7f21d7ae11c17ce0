"""The pipeline on a real GPU (``pytest -m gpu``); skipped where torch sees no CUDA device.

Run on a GPU machine with ``uv run pytest -m gpu -s`` and record the printed summary block in the
README with the GPU's name.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import mgpr_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(tmp_path: Path, *args: str) -> tuple[dict, dict, str]:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MGPR_"))}
    proc = subprocess.run(
        mgpr_cmd(*args, f"output_dir={run}", "progress=false"),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    return summary, report, proc.stdout


@pytest.mark.parametrize("model", ["resnet50", "fasterrcnn"])
def test_gpu_run_reports_real_gpu_figures(make_image, tmp_path: Path, model: str) -> None:
    img = make_image(width=4096, height=4096, objects=20, tile_size=512, overlap=64)
    summary, report, out = _run(
        tmp_path,
        f"input_path={img.path}",
        f"model={model}",
        "weights=none",
        "tile_size=512",
        "overlap=64",
        "batch_size=16",
        "workers=4",
        "accelerator=gpu",
        "gpus=1",
    )
    major, _ = torch.cuda.get_device_capability(0)
    assert summary["precision"] == ("bf16-mixed" if major >= 8 else "16-mixed")
    assert summary["tiles_predicted"] == summary["tiles_total"]
    rank = report["ranks"][0]
    assert rank["device"].startswith("cuda")
    assert rank["gpu_name"] and rank["memory_kind"] in ("gpu", "torch_reserved")
    assert rank["mem_peak_gib"] and rank["mem_peak_gib"] > 0
    if rank["memory_kind"] == "gpu":
        assert rank["util_avg_pct"] is not None
    assert "cuda" in out or rank["gpu_name"] in out
