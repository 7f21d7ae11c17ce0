"""``seam=blend`` end to end: continuous across seams, exact where tiles agree, spread over ranks.

The continuity model's output depends only on where a pixel lies INSIDE its tile (a ramp of
tile-local coordinates), the worst case for seams: ``seam=crop`` must show a step at every core
boundary and ``seam=blend`` none, on the same run settings.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import mgpr_cmd, run_mgpr_inprocess, subprocess_env

from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import owner_region, plan_tiles, tile_grid
from mgpr.models.reference import BRIGHT_THRESHOLD
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext

RAMP = '''
import torch

class TileRamp(torch.nn.Module):
    """2 classes; the 'high' logit is a ramp of the TILE's own column and row (not the raster's)."""
    task = "segmentation"
    categories = ("low", "high")
    def forward(self, x):
        b, _, h, w = x.shape
        cols = torch.linspace(-3.0, 3.0, w).view(1, 1, 1, w)
        rows = torch.linspace(-1.5, 1.5, h).view(1, 1, h, 1)
        u = (cols + rows).expand(b, 1, h, w)
        return torch.cat([-u, u], dim=1)

def build(weights):
    return TileRamp()
'''


def _args(image: Path, run: Path, *more: str) -> list[str]:
    return [
        f"input_path={image}",
        "workers=0",
        "batch_size=4",
        "accelerator=cpu",
        "progress=false",
        f"output_dir={run}",
        *more,
    ]


@pytest.fixture
def rampmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mgpr_rampmod.py").write_text(textwrap.dedent(RAMP))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mgpr_rampmod:build"


def _max_step(p: np.ndarray) -> tuple[int, int]:
    """Largest difference between horizontal and between vertical neighbours (0..255 units)."""
    q = p.astype(np.int32)
    return int(np.abs(np.diff(q, axis=1)).max()), int(np.abs(np.diff(q, axis=0)).max())


@pytest.mark.slow
def test_blend_is_continuous_across_seams_where_crop_steps(
    make_image, tmp_path: Path, rampmod: str
) -> None:
    img = make_image(width=700, height=530, objects=0)
    steps = {}
    for seam in ("crop", "blend"):
        run = tmp_path / seam
        args = _args(
            Path(img.path), run, f"model={rampmod}", "tile_size=128", "overlap=48", f"seam={seam}"
        )
        assert run_mgpr_inprocess(*args, "probabilities=true") == 0
        with rasterio.open(run / "segmentation" / "ortho_prob.tif") as src:
            high = src.read(2)
        with rasterio.open(run / "segmentation" / "ortho.tif") as src:
            ids = src.read(1)
        assert (ids != 255).all()
        # The class is the argmax of the written probabilities (2 classes: high above 127.5).
        assert np.array_equal(ids == 1, high.astype(np.int32) * 2 > 255) or seam == "crop"
        steps[seam] = _max_step(high)
    # Within one tile the ramp changes by at most ~6/255 per pixel; crop jumps at core edges.
    assert min(steps["crop"]) > 100, steps
    assert max(steps["blend"]) <= 20, steps


def _bright(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as src:
        data = src.read()
        invalid = src.dataset_mask() == 0
    return (data.astype(np.float32) / 255.0 >= np.float32(BRIGHT_THRESHOLD)).all(axis=0), invalid


def _class_map(cog: Path) -> np.ndarray:
    with rasterio.open(cog) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        return src.read(1)


@pytest.mark.slow
def test_blend_equals_the_bright_mask_with_nodata_and_failed_free_edges(
    make_image, tmp_path: Path
) -> None:
    img = make_image(width=610, height=450, objects=12, nodata="border", tile_size=160)
    run = tmp_path / "run"
    args = _args(Path(img.path), run, "model=reference-seg", "tile_size=160", "overlap=40")
    assert run_mgpr_inprocess(*args, "seam=blend", "probabilities=true") == 0
    ids = _class_map(run / "segmentation" / "ortho.tif")
    bright, invalid = _bright(Path(img.path))
    assert np.array_equal(ids == 255, invalid)
    assert np.array_equal(ids[~invalid], bright[~invalid].astype(np.uint8))
    assert (ids == 1).sum() > 100


@pytest.mark.slow
def test_blend_missing_neighbour_leaves_only_its_own_core_nodata(
    make_image, tmp_path: Path
) -> None:
    """A done tile next to a tile with no part: the absent tile's core is nodata, no more."""
    img = make_image(width=400, height=300, objects=6)
    run = tmp_path / "run"
    args = _args(Path(img.path), run, "model=reference-seg", "tile_size=128", "overlap=32")
    assert run_mgpr_inprocess(*args, "seam=blend") == 0
    from mgpr.outputs.ledger import build_ledger

    info = describe_raster(str(img.path))
    tiles = plan_tiles(info.path, info.height, info.width, 128, 32)
    by_key = {t.id.key(): t for t in tiles}
    ledger = build_ledger(run, by_key)
    gone = next(t for t in tiles if t.id.row == 1 and t.id.col == 1)
    ledger.entries.pop(gone.id.key())  # as if its part were never published
    ctx = TaskContext(
        rasters={info.path: info},
        tile_size=128,
        overlap=32,
        categories=("background", "bright"),
        seam="blend",
    )
    out = get_task("segmentation").assemble(run, ledger, ctx, by_key, info.path, tmp_path / "x")
    ids = _class_map(out[0][0])
    grid = tile_grid(info.height, info.width, 128, 32)
    r0, c0, r1, c1 = owner_region(gone, grid, info.height, info.width)
    hole = np.zeros(ids.shape, bool)
    hole[r0:r1, c0:c1] = True
    assert (ids[hole] == 255).all() and (ids[~hole] != 255).all()
    bright, _ = _bright(Path(img.path))
    assert np.array_equal(ids[~hole], bright[~hole].astype(np.uint8))


def test_blend_refuses_overlap_above_half_a_tile(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=256, height=256)
    args = _args(Path(img.path), tmp_path / "run", "model=reference-seg", "tile_size=128")
    assert run_mgpr_inprocess(*args, "overlap=80", "seam=blend") == 2
    err = capsys.readouterr().err
    assert "seam=blend needs overlap <= tile_size / 2, got overlap=80" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_crop_run_is_not_resumed_as_blend(make_image, tmp_path: Path, capsys) -> None:
    img = make_image(width=300, height=300, objects=3)
    run = tmp_path / "run"
    args = _args(Path(img.path), run, "model=reference-seg", "tile_size=128", "overlap=32")
    assert run_mgpr_inprocess(*args) == 0
    before = (run / "segmentation" / "ortho.tif").read_bytes()
    capsys.readouterr()
    assert run_mgpr_inprocess(*args, "seam=blend") == 2
    assert "seam" in capsys.readouterr().err
    assert (run / "segmentation" / "ortho.tif").read_bytes() == before


@pytest.mark.slow
def test_two_ranks_blend_and_finalise_their_own_rasters(make_image, tmp_path: Path) -> None:
    """2 rasters on 2 ranks: rank 1 assembles one COG; both equal the bright mask."""
    (tmp_path / "in").mkdir()
    a = make_image("in/a.tif", width=500, height=420, objects=8, nodata="border", seed=1)
    make_image("in/b.tif", width=460, height=380, objects=8, seed=2)
    folder = Path(a.path).parent
    common = ("model=reference-seg", "tile_size=128", "overlap=32", "seam=blend")
    two = tmp_path / "two"
    cmd = mgpr_cmd(*_args(folder, two, *common, "gpus=2", "join_timeout_s=120"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 assembled its share into merge/ and renamed both: it assembled nothing itself.
    assert f"wrote {two}/merge/raster000000.segmentation.tif" in proc.stderr
    assert f"wrote {two}/segmentation/" not in proc.stderr
    hist = np.zeros(2, dtype=np.int64)
    for name in ("a.tif", "b.tif"):
        y = _class_map(two / "segmentation" / name)
        bright, invalid = _bright(folder / name)
        assert np.array_equal(y == 255, invalid)
        assert np.array_equal(y[~invalid], bright[~invalid].astype(np.uint8))
        hist += np.bincount(y[~invalid], minlength=2)
    # Counted while each rank blended its raster, handed to rank 0 beside the COGs
    classes = json.loads((two / "summary.json").read_text())["classes"]
    assert {k: v["pixels"] for k, v in classes.items()} == {
        "background": hist[0],
        "bright": hist[1],
    }
    assert not (two / "merge").exists() and not (two / ".previews").exists()
    assert (two / "preview_a.png").exists() and (two / "preview_b.png").exists()


def _copy_parts(run: Path, prefix: str, invert: bool) -> None:
    """Copy every part of the run under ``prefix``: a re-predicted copy of every tile."""
    import pyarrow.parquet as pq

    from mgpr.outputs.parts import MANIFEST_META_KEY, MANIFEST_SUFFIX, parts_dir

    folder = parts_dir(run)
    manifests = sorted(p for p in folder.glob(f"*{MANIFEST_SUFFIX}") if p.name.startswith("r0-2"))
    for i, manifest in enumerate(manifests):
        old, name = manifest.name[: -len(MANIFEST_SUFFIX)], f"{prefix}-{i:03d}"
        table = pq.read_table(manifest)
        meta = json.loads(table.schema.metadata[MANIFEST_META_KEY])
        files = []
        for f in meta["files"]:
            new = name + f[len(old) :]
            with rasterio.open(folder / f) as src:
                profile, data, tags = src.profile, src.read(), src.tags()
            if invert:
                data[:-1] = 255 - data[:-1]  # the probabilities, not the validity band
            with rasterio.open(folder / new, "w", **profile) as dst:
                dst.write(data)
                dst.update_tags(**tags)
            files.append(new)
        meta["files"] = files
        table = table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
        pq.write_table(table, folder / f"{name}{MANIFEST_SUFFIX}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_tile_in_two_parts_is_blended_once_from_the_picked_part(
    make_image, tmp_path: Path
) -> None:
    from mgpr.outputs.ledger import build_ledger

    img = make_image(width=400, height=300, objects=6)
    run = tmp_path / "run"
    args = _args(Path(img.path), run, "model=reference-seg", "tile_size=128", "overlap=32")
    assert run_mgpr_inprocess(*args, "seam=blend") == 0
    want = _class_map(run / "segmentation" / "ortho.tif")
    info = describe_raster(str(img.path))
    by_key = {t.id.key(): t for t in plan_tiles(info.path, info.height, info.width, 128, 32)}
    ctx = TaskContext(
        rasters={info.path: info},
        tile_size=128,
        overlap=32,
        categories=("background", "bright"),
        seam="blend",
    )
    task = get_task("segmentation")
    _copy_parts(run, "r9-later", invert=True)  # sorts after the original: never picked
    ledger = build_ledger(run, by_key)
    assert ledger.duplicates == len(by_key)
    got = _class_map(task.assemble(run, ledger, ctx, by_key, info.path, tmp_path / "x")[0][0])
    assert np.array_equal(got, want)  # the inverted copy added nothing
    _copy_parts(run, "r0-0-first", invert=True)  # sorts first: picked for every tile
    ledger = build_ledger(run, by_key)
    got = _class_map(task.assemble(run, ledger, ctx, by_key, info.path, tmp_path / "y")[0][0])
    assert np.array_equal(got, 1 - want)
