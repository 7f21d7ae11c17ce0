"""The model registry: one table every other place reads (no torch needed to read it)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mgpr.errors import ModelError
from mgpr.models.registry import (
    DEFAULT_MODEL,
    DEMO_MODEL,
    KNOWN_MODELS,
    MODELS,
    check_model_name,
    downloadable_models,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_entry_is_complete() -> None:
    from torchvision.models import get_model_weights

    for name, entry in MODELS.items():
        assert entry.name == name == name.lower() and entry.summary
        module, _, attr = entry.builder.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), entry.builder
        if entry.downloadable:
            assert entry.torchvision_builder is not None
            assert len(list(get_model_weights(entry.torchvision_builder))) >= 1
    assert DEFAULT_MODEL in MODELS and DEMO_MODEL in MODELS
    assert downloadable_models() == (
        "resnet50",
        "resnet50-embed",
        "fasterrcnn",
        "maskrcnn",
        "deeplabv3",
        "fcn",
        "lraspp",
    )


def test_reading_the_table_imports_no_torch() -> None:
    code = (
        "import sys, mgpr.models.registry as r; r.check_model_name('resnet50'); "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_model_names_are_checked_before_any_build() -> None:
    for ok in (*KNOWN_MODELS, "pkg.mod:build", "pkg.mod.build", None):
        check_model_name(ok)
    with pytest.raises(ModelError, match="did you mean model=fasterrcnn"):
        check_model_name("fasterrcnnn")
    with pytest.raises(ModelError, match="use model=null"):
        check_model_name("none")


def test_the_names_come_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    """mgpr --help, mgpr-fetch-weights --help and mgpr-doctor list what the table holds."""
    from typer.testing import CliRunner

    from mgpr.cli.doctor import DEFAULT_MODELS
    from mgpr.cli.main import main
    from mgpr.cli.weights import app

    main(["--help"])
    help_text = capsys.readouterr().out
    for name, entry in MODELS.items():
        assert re.search(rf"^  {name} +{entry.task} +{re.escape(entry.summary)}", help_text, re.M)
    fetch_help = CliRunner().invoke(app, ["--help"], terminal_width=200).stdout
    assert all(name in fetch_help for name in downloadable_models())
    assert DEFAULT_MODELS == downloadable_models()


def test_the_readme_lists_every_model() -> None:
    readme = (REPO / "README.md").read_text()
    for name in MODELS:
        assert re.search(rf"^\| `{name}` \|", readme, re.M), f"README has no row for {name}"
