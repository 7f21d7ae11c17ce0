"""Lint and types are part of the suite: ruff on everything, mypy strict on the core modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "mgpr", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_mypy_strict_core_modules() -> None:
    modules = [
        "mgpr/geo/tiling.py",
        "mgpr/geo/georef.py",
        "mgpr/geo/raster.py",
        "mgpr/geo/gsd.py",
        "mgpr/geo/ground_area.py",
        "mgpr/outputs/parts.py",
        "mgpr/outputs/parts_read.py",
        "mgpr/outputs/part_thread.py",
        "mgpr/outputs/ledger.py",
        "mgpr/tasks/seam_dedupe.py",
        "mgpr/tasks/layers.py",
        "mgpr/tasks/segmentation_classes.py",
        "mgpr/models/tta.py",
        "mgpr/models/detection.py",
        "mgpr/models/embedding.py",
        "mgpr/tasks/embedding.py",
        "mgpr/monitor/embedding_colours.py",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_import_layers_contract() -> None:
    """A wrong-way import (geo importing torch, data importing run/, ...) fails the suite."""
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout
