"""Tests of mgpr.models.weights and the mgpr-fetch-weights CLI (no network, temp TORCH_HOME)."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mgpr.models.weights as weights_mod
from mgpr.cli.weights import app
from mgpr.errors import EXIT_USAGE, ModelError
from mgpr.models.weights import (
    fetch_weights,
    file_sha256,
    file_weights_id,
    load_checkpoint,
    weights_cache_file,
    weights_cached,
)


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point torch.hub at an empty temp dir."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download raise URLError; records the URLs tried."""
    tried: list[str] = []

    def fail(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> None:
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(weights_mod, "_download", fail)
    return tried


class Tiny(torch.nn.Module):
    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, out)


def test_cache_file_names(torch_home: Path) -> None:
    ckpts = torch_home / "hub" / "checkpoints"
    assert weights_cache_file("resnet50", "DEFAULT") == ckpts / "resnet50-11ad3fa6.pth"
    assert weights_cache_file("resnet50", "IMAGENET1K_V1") == ckpts / "resnet50-0676ba61.pth"
    assert weights_cache_file("fasterrcnn", "COCO_V1") == (
        ckpts / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    )
    for name, weights in [("resnet50", "none"), ("reference", "DEFAULT"), ("x.y:z", "DEFAULT")]:
        assert weights_cache_file(name, weights) is None
        assert weights_cached(name, weights)
    assert not weights_cached("fasterrcnn", "DEFAULT")
    target = weights_cache_file("fasterrcnn", "DEFAULT")
    assert target is not None
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert weights_cached("fasterrcnn", "DEFAULT")


def test_fetch_downloads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str | None]] = []

    def fake(url: str, dst: Path, hash_prefix: str | None, progress: bool) -> None:
        calls.append((url, hash_prefix))
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"weights")

    monkeypatch.setattr(weights_mod, "_download", fake)
    path = fetch_weights("resnet50", "DEFAULT")
    assert path == weights_cache_file("resnet50", "DEFAULT") and path is not None and path.is_file()
    assert fetch_weights("resnet50", "IMAGENET1K_V2") == path
    assert calls == [("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "11ad3fa6")]
    assert fetch_weights("resnet50", "none") is None


def test_fetch_offline_message(offline: list[str], torch_home: Path) -> None:
    with pytest.raises(ModelError) as info:
        fetch_weights("fasterrcnn", "DEFAULT")
    msg = str(info.value)
    ckpts = torch_home / "hub" / "checkpoints"
    assert msg == (
        f"weights=DEFAULT for fasterrcnn are not in the cache ({ckpts}) and cannot be downloaded "
        "([Errno -3] Temporary failure in name resolution); on a machine with internet run "
        f"`mgpr-fetch-weights fasterrcnn` (TORCH_HOME={torch_home}) or pass weights=<local .pth>."
    )
    assert len(offline) == 1
    with pytest.raises(ModelError, match="`mgpr-fetch-weights resnet50 --weights IMAGENET1K_V1`"):
        fetch_weights("resnet50", "IMAGENET1K_V1")


def test_load_checkpoint_forms(tmp_path: Path) -> None:
    src = Tiny()
    sd = src.state_dict()
    forms = {
        "raw.pth": sd,
        "wrapped.ckpt": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    for name, obj in forms.items():
        path = tmp_path / name
        torch.save(obj, path)
        dst = Tiny()
        weights_id = load_checkpoint(path, dst)
        assert weights_id == f"file:{path.resolve()}#sha256:{file_sha256(path)}"
        for key, value in sd.items():
            torch.testing.assert_close(dst.state_dict()[key], value)


def test_load_safetensors_checkpoints(tmp_path: Path) -> None:
    """Hugging Face / timm fine-tunes save .safetensors: read as tensors, never as a pickle."""
    from safetensors.torch import save_file

    sd = Tiny().state_dict()
    path = tmp_path / "model.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, path)
    dst = Tiny()
    assert load_checkpoint(path, dst) == f"file:{path.resolve()}#sha256:{file_sha256(path)}"
    for key, value in sd.items():
        torch.testing.assert_close(dst.state_dict()[key], value)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ModelError, match=r"weights=.*torn.safetensors is not a readable"):
        load_checkpoint(torn, Tiny())


def test_load_checkpoint_mismatch_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    state = Tiny(out=5).state_dict()
    del state["conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path, Tiny(), model_name="tiny")
    msg = str(info.value)
    assert msg.startswith(f"weights={path} does not fit model=tiny:")
    assert "1 missing: conv.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "fc.weight (5, 4) vs (2, 4)" in msg and "\n" not in msg


def test_load_checkpoint_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pth", Tiny())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        load_checkpoint(garbage, Tiny())
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(ModelError, match="holds list, not a state_dict"):
        load_checkpoint(a_list, Tiny())


def test_file_hash_helpers(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(path) == digest[:16]
    assert file_weights_id(path) == f"file:{path.resolve()}#sha256:{digest[:16]}"


# ---------------------------------------------------------------- CLI


def test_cli_offline_is_one_line_exit_2(offline: list[str]) -> None:
    result = CliRunner().invoke(app, ["fasterrcnn", "--no-progress"])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be downloaded" in lines[0]
    assert "mgpr-fetch-weights fasterrcnn" in lines[0]


def test_cli_cached_file_prints_path_and_size(offline: list[str]) -> None:
    target = weights_cache_file("resnet50", "IMAGENET1K_V1")
    assert target is not None
    target.parent.mkdir(parents=True)
    target.write_bytes(b"0" * 1234)  # never loaded: the CLI only checks the cache
    result = CliRunner().invoke(app, ["resnet50", "--weights", "IMAGENET1K_V1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{target}\t1234 bytes\n"
    assert offline == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["reference"], "MODEL reference has no downloadable weights"),
        (["resnet5"], "MODEL resnet5 has no downloadable weights; did you mean resnet50?"),
        (["fasterrcnn:COCO_V1"], "`mgpr-fetch-weights fasterrcnn --weights COCO_V1`"),
        (["resnet50", "--weights", "none"], "nothing to download"),
        (
            ["resnet50", "--weights", "V9"],
            "--weights V9 is not a torchvision weights name of resnet50; use one of DEFAULT, "
            "IMAGENET1K_V1, IMAGENET1K_V2.",
        ),
    ],
)
def test_cli_usage_errors(args: list[str], needle: str, offline: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_other_ranks_wait_for_rank0_download_then_name_the_prefetch(offline: list[str]) -> None:
    """Rank 1 never downloads itself: it waits join_timeout_s for rank 0's file, then says how
    to pre-fetch (and never falls back to random weights)."""
    from mgpr.conf.load import load_config
    from mgpr.run.adapter import build_adapter

    cfg = load_config(["model=resnet50", "join_timeout_s=1"])
    target = weights_cache_file("resnet50", "DEFAULT")
    with pytest.raises(ModelError, match="rank 1 waited 1 s for rank 0 to download") as err:
        build_adapter(cfg, "resnet50", rank=1)
    message = str(err.value)
    assert "`mgpr-fetch-weights resnet50`" in message and str(target.parent) in message
    assert offline == []  # no download tried by rank 1


# ---------------------------------------------------------------- torchvision's own lookup


@pytest.mark.parametrize("name", ["resnet50", "fasterrcnn"])
def test_cache_file_is_torchvisions_name_for_every_weight(name: str, torch_home: Path) -> None:
    """The hub file of each member is the basename of torchvision's own URL for it."""
    from torchvision.models import get_weight

    enum_cls = weights_mod.weights_enum_class(name)
    assert enum_cls is not None
    for member in enum_cls:
        full = f"{enum_cls.__name__}.{member.name}"
        expected = torch_home / "hub" / "checkpoints" / get_weight(full).url.rsplit("/", 1)[1]
        for spelling in (member.name, full, member.name.lower()):
            assert weights_cache_file(name, spelling) == expected
            assert weights_mod.resolve_weights(name, spelling).weights_id == full


def test_another_models_weights_are_refused_listing_the_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        weights_mod.resolve_weights("resnet50", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1")
    msg = str(info.value)
    assert "use one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, none, <local checkpoint path>" in msg
    assert "\n" not in msg


def test_prefilled_torch_home_is_loaded_without_download(
    torch_home: Path, offline: list[str]
) -> None:
    """A state_dict saved under the hub file name torchvision expects is what DEFAULT loads."""
    from mgpr.models import build_model

    random = build_model("fasterrcnn", "none", tile_size=64)
    target = weights_cache_file("fasterrcnn", "DEFAULT")
    assert target is not None and target.name == "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    target.parent.mkdir(parents=True)
    state = {k: v for k, v in random.module.state_dict().items() if "num_batches" not in k}
    torch.save(state, target)
    loaded = build_model("fasterrcnn", "DEFAULT", tile_size=64)
    assert loaded.weights_id == "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert not loaded.random_weights and offline == []
    head = "roi_heads.box_predictor.cls_score.weight"
    torch.testing.assert_close(loaded.module.state_dict()[head], state[head])


class _RunsCode:
    """Unpickling this calls os.system: what a poisoned file in a shared TORCH_HOME could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_cached_hub_file_holding_code_is_refused_not_run(
    tmp_path: Path, offline: list[str]
) -> None:
    """torchvision loads hub files with weights_only=False; mgpr forces weights_only=True."""
    import os

    from mgpr.models import build_model

    marker = tmp_path / "code-ran"
    target = weights_cache_file("resnet50", "IMAGENET1K_V1")
    assert target is not None
    target.parent.mkdir(parents=True)
    torch.save({"fc.weight": _RunsCode(marker)}, target)
    with pytest.raises(ModelError, match="the cached file .* cannot be loaded") as info:
        build_model("resnet50", "IMAGENET1K_V1")
    assert not marker.exists() and "\n" not in str(info.value)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the build
