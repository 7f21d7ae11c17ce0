"""Config files the Hydra way: -cp DIR -cn NAME, --cfg job, -m refused (Hydra compose, in process;
one 2-rank run in a subprocess, as Lightning re-runs the command line for rank 1)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import mgpr_cmd, run_mgpr_inprocess, subprocess_env
from typer.testing import CliRunner

from mgpr.conf.command import MULTIRUN_REFUSED, parse_command
from mgpr.conf.load import config_yaml, explicit_keys, load_config
from mgpr.errors import ConfigError


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A config directory holding ortho.yaml."""
    d = tmp_path / "conf"
    d.mkdir()
    (d / "ortho.yaml").write_text(
        "# an ortho job\ntile_size: 256\noverlap: 32\nmodel: fasterrcnn\nbands: [1, 2, 3]\n"
    )
    return d


def _one_line_error(*args: str, **kw: str | None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(list(args), **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_file_then_overrides(conf: Path) -> None:
    cfg = load_config(["overlap=64", "batch_size=4"], str(conf), "ortho")
    assert (cfg.tile_size, cfg.overlap, cfg.batch_size) == (256, 64, 4)  # overrides win
    assert cfg.model == "fasterrcnn" and cfg.bands == [1, 2, 3]
    assert load_config([], str(conf), "ortho.yaml") == load_config([], str(conf), "ortho")
    assert load_config([]).tile_size == 512  # no file: the schema's defaults


def test_a_yaml_list_of_inputs(conf: Path) -> None:
    (conf / "two.yaml").write_text("input_path:\n  - flight1/\n  - /data/b.tif\n")
    assert load_config([], str(conf), "two").input_path == ["flight1/", "/data/b.tif"]
    assert load_config(["input_path=c.tif"], str(conf), "two").input_path == "c.tif"


def test_config_name_alone_reads_the_current_directory(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(conf)
    assert load_config([], None, "ortho").tile_size == 256
    monkeypatch.chdir(conf.parent)
    assert load_config([], "conf", "ortho").tile_size == 256  # -cp relative to the cwd


def test_unknown_key_in_the_file_names_the_file_and_the_closest_key(conf: Path) -> None:
    (conf / "typo.yaml").write_text("tile_size: 256\nbach_size: 4\n")
    msg = _one_line_error(config_path=str(conf), config_name="typo")
    assert msg == (
        f"unknown config key `bach_size` in config file {conf / 'typo.yaml'}; "
        "did you mean `batch_size`?"
    )


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("tile_size: abc\n", ["`tile_size: abc`", "expects int"]),
        ("overwrite: maybe\n", ["`overwrite: maybe`", "expects bool"]),
        ("weights: null\n", ["`weights: null`", "weights: none"]),
        ("tile_size: [1\n", ["is not valid YAML (line 2)"]),
        ("- tile_size\n", ["holds a list, not `key: value` lines"]),
        ("tile_size: 64\noverlap: 64\n", ["overlap"]),  # ranges are checked as for overrides
    ],
)
def test_bad_values_in_the_file_are_one_line(conf: Path, text: str, needles: list[str]) -> None:
    (conf / "bad.yaml").write_text(text)
    msg = _one_line_error(config_path=str(conf), config_name="bad")
    assert all(n in msg for n in needles), msg
    if "overlap" not in needles:
        assert str(conf / "bad.yaml") in msg


def test_missing_file_and_path_without_name(tmp_path: Path) -> None:
    msg = _one_line_error(config_path=str(tmp_path / "nope"), config_name="ortho")
    assert f"config file {tmp_path / 'nope' / 'ortho.yaml'} does not exist" in msg
    assert "needs -cn NAME" in _one_line_error(config_path=str(tmp_path))


def test_wrong_override_type_still_names_the_override(conf: Path) -> None:
    msg = _one_line_error("batch_size=abc", config_path=str(conf), config_name="ortho")
    assert "'batch_size=abc'" in msg and "expects int" in msg


def test_hydra_defaults_list_and_a_file_named_mgpr(conf: Path) -> None:
    """A file written after Hydra's structured-config tutorial, and one called mgpr.yaml."""
    (conf / "tutorial.yaml").write_text("defaults:\n  - mgpr_schema\n  - _self_\ntile_size: 128\n")
    assert load_config([], str(conf), "tutorial").tile_size == 128
    (conf / "mgpr.yaml").write_text("tile_size: 1024\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "validated against ConfigStore schema" deprecation
        assert load_config([], str(conf), "mgpr").tile_size == 1024


def test_a_defaults_list_naming_a_config_that_is_not_there_is_one_line(conf: Path) -> None:
    """``- mgpr`` (the program's name, not its schema's) or a sibling's misspelt name."""
    (conf / "base.yaml").write_text("tile_size: 128\n")
    for name in ("mgpr", "bse"):
        (conf / "job.yaml").write_text(f"defaults:\n  - {name}\n  - _self_\nworkers: 0\n")
        msg = _one_line_error(config_path=str(conf), config_name="job")
        assert f"config file {conf / 'job.yaml'}: its defaults list names {name!r}" in msg, msg
        assert f"no config in {conf}" in msg and f"remove `- {name}`" in msg
    (conf / "job.yaml").write_text("defaults:\n  - base\n  - _self_\nworkers: 0\n")
    assert load_config([], str(conf), "job").tile_size == 128


def test_yaml_null_is_unset_and_the_null_model_is_quoted(conf: Path) -> None:
    (conf / "n.yaml").write_text("model: null\n")
    assert load_config([], str(conf), "n").model is None
    (conf / "n.yaml").write_text("model: 'null'\n")
    assert load_config([], str(conf), "n").model == "null"


def test_explicit_keys_include_the_files(conf: Path) -> None:
    keys = explicit_keys(["gpus=2", "+workers=0"], str(conf), "ortho")
    assert keys == {"gpus", "workers", "tile_size", "overlap", "model", "bands"}


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv",
    [
        ["-cp", "conf", "-cn", "ortho", "gpus=2"],
        ["--config-path", "conf", "--config-name", "ortho", "gpus=2"],
        ["--config-path=conf", "--config-name=ortho", "gpus=2"],
        ["gpus=2", "-cn=ortho", "-cp=conf"],
    ],
)
def test_hydra_flag_spellings(argv: list[str]) -> None:
    inv = parse_command(argv)
    assert (inv.config_path, inv.config_name, inv.overrides) == ("conf", "ortho", ("gpus=2",))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-cp"], "expected one argument"),
        (["--cfg", "hydra"], "use --cfg job"),
        (["--gpus=2"], "unknown option '--gpus=2'"),
        (["--hydra-help"], "mgpr --help lists every key"),
    ],
)
def test_bad_flags_are_one_line(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        parse_command(argv)
    assert "\n" not in str(err.value)


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(
    conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["--cfg", "job", "-cp", str(conf), "-cn", "ortho", "image_path=a.tif"]
    assert run_mgpr_inprocess(*argv, f"output_dir={run}") == 0
    out = capsys.readouterr().out
    assert "tile_size: 256\n" in out and "input_path: a.tif\n" in out  # alias resolved
    assert not run.exists()
    (conf / "resolved.yaml").write_text(out)  # what --cfg job prints reads back as the same run
    again = load_config([], str(conf), "resolved")
    expected = load_config(["image_path=a.tif", f"output_dir={run}"], str(conf), "ortho")
    assert dataclasses.asdict(again) == dataclasses.asdict(expected)
    assert config_yaml(again) == out


def test_cfg_job_of_the_quick_start_prints_its_own_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quick start runs 512 px tiles with 64 px overlap and random reference weights;
    --cfg job printed overlap 0, so a file saved from it ran without overlap."""
    assert run_mgpr_inprocess("--cfg", "job", "tile_size=256") == 0
    out = capsys.readouterr().out
    assert "tile_size: 256\n" in out and "overlap: 64\n" in out  # the user's key is kept
    assert "weights: none\n" in out and "model: null\n" in out


@pytest.mark.parametrize("flag", ["-m", "--multirun"])
def test_multirun_is_refused_with_why_and_what_instead(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_mgpr_inprocess(flag, "tile_size=256,512") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mgpr: error: {MULTIRUN_REFUSED}"]
    assert "one run per command" in err[0] and "instead" in err[0]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bach_size: 4\n", "did you mean `batch_size`?"),
        ("model: resnt50\n", "did you mean model=resnet50?"),
    ],
)
def test_cli_file_errors_exit_2(
    conf: Path, text: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (conf / "bad.yaml").write_text(text)
    assert run_mgpr_inprocess("-cp", str(conf), "-cn", "bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mgpr: error:") and needle in err[0]


def test_config_file_keys_for_the_job_script(
    conf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_mgpr_inprocess("--config-file-keys", "-cp", str(conf), "-cn", "ortho") == 0
    assert capsys.readouterr().out.split() == ["bands", "model", "overlap", "tile_size"]


def test_slurm_job_bakes_in_a_checked_config_file(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mgpr.cli.slurm_job import app

    monkeypatch.chdir(conf.parent)
    result = CliRunner().invoke(app, ["--gpus-per-node", "2", "--", "-cp", "conf", "-cn", "ortho"])
    assert result.exit_code == 0, result.stderr
    assert 'set -- -cp conf -cn ortho "$@"' in result.stdout.splitlines()
    (conf / "bad.yaml").write_text("tile_sise: 3\n")
    for args in (["-cp", "conf", "-cn", "bad"], ["-m", "tile_size=1"], ["-cn", "nope"]):
        result = CliRunner().invoke(app, ["--", *args])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, args


@pytest.mark.slow
def test_two_cpu_ranks_read_the_config_file(make_image, tmp_path: Path) -> None:
    """Lightning's subprocess launcher re-runs the command line for rank 1: -cp/-cn (relative
    to the working directory) must reach it, so both ranks run the file's config."""
    img = make_image(width=4 * 128, height=128, objects=3, tile_size=128)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "two.yaml").write_text(
        f"input_path: {img.path}\nmodel: reference\ntile_size: 128\naccelerator: cpu\n"
        "gpus: 2\nworkers: 0\nprogress: false\n"
    )
    cmd = mgpr_cmd("-cp", "conf", "-cn", "two", "output_dir=run")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tiles_predicted"] == 4
    assert summary["model"] == "reference"
    from mgpr.outputs.parts_read import read_manifests

    manifests = read_manifests(tmp_path / "run")
    assert sorted(manifests["tile_key"].to_pylist()) == sorted(
        set(manifests["tile_key"].to_pylist())
    )
    assert {n.split("-")[0] for n in manifests["part"].to_pylist()} <= {"r0", "r1"}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(r["global_rank"] for r in report["ranks"]) == [0, 1]  # both ranks ran
