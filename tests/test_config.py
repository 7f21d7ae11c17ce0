"""Config: legacy keys, typed schema, one-line errors (Hydra compose, no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpr.conf.load import closest_key, describe_keys, load_config
from mgpr.errors import ConfigError


def test_defaults_and_types() -> None:
    cfg = load_config([])
    assert cfg.tile_size == 512 and cfg.batch_size == 8 and cfg.precision == "auto"
    cfg = load_config(["tile_size=256", "overlap=32", "batch_size=4", "bands=[1,2,3]"])
    assert (cfg.tile_size, cfg.overlap, cfg.batch_size, cfg.bands) == (256, 32, 4, [1, 2, 3])


@pytest.mark.parametrize(
    ("args", "attr", "value"),
    [
        (["image_path=a.tif"], "input_path", "a.tif"),
        (["input_path=a.tif"], "input_path", "a.tif"),
        (["devices=3"], "gpus", 3),
        (["gpus=2"], "gpus", 2),
        (["workers=0"], "workers", 0),
        (["precision=bf16-mixed"], "precision", "bf16-mixed"),
        (["precision=bf16"], "precision", "bf16-mixed"),  # Lightning 1.x spellings
        (["precision=16"], "precision", "16-mixed"),
        (["precision=FP32"], "precision", "32"),
        (["accelerator=cpu"], "accelerator", "cpu"),
        (
            ["use_fake_data=true", "dummy_dataset_delay=0.5", "dummy_dataset_count=7"],
            "dummy_dataset_count",
            7,
        ),
        (["image_size=1024"], "image_size", 1024),
        (["weights=None"], "weights", "none"),
    ],
)
def test_legacy_keys_keep_their_meaning(args: list[str], attr: str, value: object) -> None:
    assert getattr(load_config(args), attr) == value


def test_tilde_and_variables_in_path_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quoted or in a config file, ~ reached mgpr as is: output_dir='~/runs' made a folder "~"."""
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config(
        ["input_path='~/data/o.tif'", "output_dir='~/runs/a'", "weights='~/ckpt/m.pth'"]
    )
    assert cfg.input_path == "/home/someone/data/o.tif"
    assert cfg.output_dir == "/home/someone/runs/a"
    assert cfg.weights == "/home/someone/ckpt/m.pth"
    assert load_config(["weights=DEFAULT"]).weights == "DEFAULT"
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    monkeypatch.delenv("MGPR_UNSET_VAR", raising=False)
    cfg = load_config(["input_path='$SCRATCH/o.tif'", "output_dir='$MGPR_UNSET_VAR/runs'"])
    assert cfg.input_path == "/scratch/me/o.tif"
    assert cfg.output_dir == "$MGPR_UNSET_VAR/runs"  # unset: kept, so its error names it


def test_input_path_takes_a_list_but_a_glob_stays_a_glob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    cfg = load_config(["input_path=[a.tif,'$SCRATCH/b.tif',tiles/]"])
    assert cfg.input_path == ["a.tif", "/scratch/me/b.tif", "tiles/"]
    assert load_config(["input_path=[a.tif]"]).input_path == "a.tif"  # one item: that path
    assert load_config(["input_path=tiles/[ab]*.tif"]).input_path == "tiles/[ab]*.tif"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[x,y]").write_bytes(b"")  # a file of that very name stays that path
    assert load_config(["input_path=[x,y]"]).input_path == "[x,y]"
    with pytest.raises(ConfigError, match=r"input_path=\[\] lists no input"):
        load_config(["input_path=[]"])
    with pytest.raises(ConfigError, match="input_path lists 3, which is not a path"):
        load_config(["input_path=[a.tif,3]"])


def test_aliases_that_disagree_are_refused() -> None:
    with pytest.raises(ConfigError, match="image_path"):
        load_config(["image_path=a.tif", "input_path=b.tif"])


def test_misspelt_key_names_the_closest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["bach_size=4"])
    msg = str(err.value)
    assert "bach_size" in msg and "batch_size" in msg and "\n" not in msg
    assert closest_key("tilesize") == "tile_size"


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("batch_size=abc", "batch_size"),
        ("tile_size=1.5", "tile_size"),
        ("overwrite=maybe", "overwrite"),
    ],
)
def test_wrong_type_is_one_line(arg: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([arg])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["tile_size=0"], "tile_size"),
        (["tile_size=64", "overlap=64"], "overlap"),
        (["overlap=-1"], "overlap"),
        (["batch_size=0"], "batch_size"),
        (["workers=-1"], "workers"),
        (["precision=fp8"], "precision"),
        (["previews=some"], "previews='some' is not supported; use one of auto, all, none"),
        (["strategy=ddp_spawn"], "strategy='ddp_spawn' is not supported: mgpr runs each rank"),
        (["strategy=fsdp"], "use strategy=auto .DDP when more than one rank., ddp or single"),
        (["profiler=x"], "profiler='x' is not known; use one of: none, simple, advanced"),
        (["topk=101"], "topk=101 is out of range: it must be <= 100 .each kept class is 3"),
        (["precision=bf16-true"], "runs half precision as autocast, which keeps box coordinates"),
        (["precision=64"], "precision='64' is not supported: float64 compute is not offered"),
        (["precision=16-true"], r"keeps box coordinates in float32 \(precision=16-mixed\)"),
        (["nms_iou=1.5"], "nms_iou"),
        (["bands=[0,1]"], "bands"),
        (["not-an-override"], "key=value"),
    ],
)
def test_ranges(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(args)


def test_help_lists_every_key() -> None:
    text = describe_keys()
    for key in (
        "input_path",
        "image_path",
        "gpus",
        "tile_size",
        "overlap",
        "model",
        "weights",
        "use_fake_data",
        "dummy_dataset_delay",
        "output_dir",
        "overwrite",
    ):
        assert f"{key}=" in text


def test_null_model_name_is_not_yaml_null() -> None:
    assert load_config(["model=null"]).model == "null"
    assert load_config(["weights=null"]).weights == "none"


def test_every_key_has_help_metadata() -> None:
    import dataclasses

    from mgpr.conf.schema import PredictConfig

    text = describe_keys()
    for field in dataclasses.fields(PredictConfig):
        help_text = field.metadata.get("help", "")
        assert help_text.strip(), f"{field.name} has no help"
        assert help_text in text
    assert "overlap=0 " in text and "overwrite=false " in text and "input_path=null " in text


def test_readme_key_list_is_what_mgpr_help_prints() -> None:
    """README's "Configuration keys" block is ``describe_keys()`` verbatim (it says so)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = readme.index("INPUTS")
    end = next(i for i in range(start, len(readme)) if readme[i].startswith("```"))
    assert "\n".join(readme[start:end]).strip() == describe_keys().strip()


def test_single_device_strategy_is_one_rank_only() -> None:
    """strategy=single_device on one rank is Lightning's; with several ranks (or under srun)
    a one-line error, not Lightning's traceback after the run directory was made."""
    from mgpr.run.trainer import _strategy

    cfg = load_config(["strategy=single_device"])
    assert _strategy(cfg, 1, False) == "single_device"
    with pytest.raises(ConfigError, match="runs one rank, but this run has 2 rank"):
        _strategy(cfg, 2, False)
    with pytest.raises(ConfigError, match="under srun; use strategy=auto or ddp"):
        _strategy(cfg, 1, True)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["input_path", "=", "a.tif"], "write `input_path=a.tif` without spaces around ="),
        (["input_path", "=a.tif", "gpus=2"], "write `input_path=a.tif` without spaces around ="),
        (["input_path:a.tif"], "write `input_path=a.tif` (key: value is a config file's"),
        (["ortho.tif", "gpus=2"], "to predict it write `mgpr input_path=ortho.tif`"),
        (["tile_size"], "give it a value: `tile_size=<value>`"),
        (["banana"], "write e.g. `mgpr tile_size=512`"),
    ],
)
def test_an_argument_that_is_not_key_value_says_what_was_meant(argv: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv",
    [["--input_path", "a.tif"], ["--input-path=a.tif"], ["gpus=2", "--input_path", "a.tif"]],
)
def test_a_key_written_as_an_option_is_answered_with_its_override(argv: list[str]) -> None:
    from mgpr.conf.command import parse_command

    with pytest.raises(ConfigError, match=r"without dashes; write `mgpr input_path=a\.tif`$"):
        parse_command(argv)


def test_a_non_ascii_value_is_told_to_be_quoted() -> None:
    """Hydra's grammar reads letters such as 'ê' only inside quotes: the refusal said the list
    did not fit a list key; now it names the letter and the quoting that loads."""
    for arg, fix in (
        ("categories=[forêt,bâti]", """'categories=["forêt",...]'"""),
        ("input_path=/data/örtho.tif", """'input_path="/data/örtho.tif"'"""),
        ("output_dir=~/runs", """'output_dir="~/runs"'"""),  # ~ # & ; ! stop Hydra's lexer too
        ("input_path=a#b.tif", """'input_path="a#b.tif"'"""),
    ):
        with pytest.raises(ConfigError) as refused:
            load_config([arg])
        line = str(refused.value)
        assert "only inside quotes" in line and fix in line, line
    assert load_config(['categories=["forêt","bâti"]']).categories == ["forêt", "bâti"]
    assert load_config(['input_path="/data/örtho.tif"']).input_path == "/data/örtho.tif"


@pytest.mark.parametrize("key", ["input_path", "weights", "output_dir", "aoi"])
def test_an_empty_value_is_refused_not_read_as_here_or_random(key: str) -> None:
    """input_path=$ORTHO with ORTHO unset predicted every raster of the current folder, and
    weights=$CKPT ran random weights: an empty value is one line naming the key."""
    with pytest.raises(ConfigError, match=rf"^{key}= is empty \(an unset shell variable"):
        load_config([f"{key}="])
