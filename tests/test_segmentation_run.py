"""Segmentation end to end: reference-seg class maps against the image's own bright pixels.

The reference segmenter classes a pixel 1 where every band is bright (>= 229.5/255), 0
elsewhere; so the assembled class map must equal that mask at every pixel of a tile that was
predicted, and be nodata (255) exactly where the input is nodata. Runs are CPU,
``workers=0``, small rasters with padded edge tiles.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import mgpr_cmd, run_mgpr_inprocess, segmentation_args, subprocess_env
from rasterio.enums import MaskFlags

from mgpr.models.reference import BRIGHT_THRESHOLD
from mgpr.outputs.parts_read import finished_tile_keys


def _bright(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image's bright-pixel mask and its invalid (nodata) pixels."""
    with rasterio.open(path) as src:
        data = src.read()
        invalid = src.dataset_mask() == 0
    bright = (data.astype(np.float32) / 255.0 >= np.float32(BRIGHT_THRESHOLD)).all(axis=0)
    return bright, invalid


def _args(image: Path, run: Path, *more: str, model: str = "reference-seg") -> list[str]:
    """Each test gives its own tiling in ``more``."""
    return segmentation_args(image, run, *more, model=model, tile_size=None, overlap=None)


def _check_class_map(cog: Path, image: Path) -> np.ndarray:
    bright, invalid = _bright(image)
    with rasterio.open(cog) as out, rasterio.open(image) as src:
        assert (out.height, out.width, out.crs, out.transform) == (
            src.height,
            src.width,
            src.crs,
            src.transform,
        )
        assert out.dtypes[0] == "uint8" and out.nodata == 255
        ids = out.read(1)
    predicted = ids != 255
    assert np.array_equal(ids[predicted], bright[predicted].astype(np.uint8))
    assert np.array_equal(~predicted, invalid)  # nodata exactly where the input is nodata
    return ids


@pytest.mark.slow
@pytest.mark.parametrize(("tile_size", "overlap"), [(128, 0), (128, 48), (256, 64), (160, 30)])
def test_class_map_equals_the_bright_mask(
    make_image, tmp_path: Path, capsys, tile_size, overlap
) -> None:
    img = make_image(width=700, height=530, objects=12, nodata="border", tile_size=tile_size)
    run = tmp_path / "run"
    code = run_mgpr_inprocess(*_args(img.path, run, f"tile_size={tile_size}", f"overlap={overlap}"))
    assert code == 0
    ids = _check_class_map(run / "segmentation" / "ortho.tif", Path(img.path))
    assert (ids == 1).sum() > 100 and (ids == 255).sum() > 0
    summary = json.loads((run / "summary.json").read_text())
    classified = int((ids != 255).sum())  # the written nodata pixels are named apart
    assert sum(c["pixels"] for c in summary["classes"].values()) == classified
    nodata = summary["records"] - classified
    assert f"class-map pixels, {classified} classified, {nodata} nodata)" in capsys.readouterr().out
    assert summary["task"] == "segmentation"
    assert summary["output"] == str(run / "segmentation" / "ortho.tif")


@pytest.mark.slow
def test_output_is_a_valid_cog_with_probabilities(make_image, tmp_path: Path) -> None:
    img = make_image(width=1300, height=1100, objects=20)
    run = tmp_path / "run"
    args = _args(img.path, run, "tile_size=256", "overlap=64", "probabilities=true")
    assert run_mgpr_inprocess(*args) == 0
    cog = run / "segmentation" / "ortho.tif"
    ids = _check_class_map(cog, Path(img.path))
    with rasterio.open(cog) as out:
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.block_shapes[0] == (512, 512) and out.overviews(1)
        assert out.colormap(1)[1][3] == 255
        assert json.loads(out.tags()["class_names"]) == ["background", "bright"]
    with rasterio.open(run / "segmentation" / "ortho_prob.tif") as prob:
        assert prob.count == 2 and prob.dtypes[0] == "uint8" and prob.overviews(1)
        assert prob.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        p = prob.read()
    assert np.array_equal(p[1], ids * 255) and np.array_equal(p[0], (1 - ids) * 255)
    summary = json.loads((run / "summary.json").read_text())
    assert str(run / "segmentation" / "ortho_prob.tif") in summary["outputs"]


def test_probabilities_are_masked_where_the_class_map_is_nodata(make_image, tmp_path: Path) -> None:
    """Every uint8 is a probability, so no nodata value is left: the input's nodata border
    read as "probability 0" and drew opaque black in QGIS. The file's internal mask (valid
    where the class map is not nodata) keeps it out, in the overviews too."""
    img = make_image(width=700, height=530, objects=12, nodata="border", tile_size=256)
    run = tmp_path / "run"
    args = _args(img.path, run, "tile_size=256", "overlap=64", "probabilities=true")
    assert run_mgpr_inprocess(*args) == 0
    with rasterio.open(run / "segmentation" / "ortho.tif") as cls:
        valid = cls.read(1) != cls.nodata
    assert 0 < valid.sum() < valid.size  # the border is there
    with rasterio.open(run / "segmentation" / "ortho_prob.tif") as prob:
        assert all(MaskFlags.per_dataset in f for f in prob.mask_flag_enums), prob.mask_flag_enums
        assert np.array_equal(prob.dataset_mask() > 0, valid)
        assert prob.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert prob.nodata is None  # no band value is taken away from the probabilities


def test_adding_probabilities_on_a_resume_is_refused(
    make_image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The finished tiles' parts hold no probabilities: a _prob.tif of zeros was written."""
    img = make_image(width=300, height=200, objects=3)
    run = tmp_path / "run"
    assert run_mgpr_inprocess(*_args(img.path, run, "tile_size=128")) == 0
    before = (run / "segmentation" / "ortho.tif").read_bytes()
    capsys.readouterr()
    assert run_mgpr_inprocess(*_args(img.path, run, "tile_size=128", "probabilities=true")) == 2
    err = capsys.readouterr().err
    assert "holds results of another run (probabilities differs" in err and "Traceback" not in err
    assert not (run / "segmentation" / "ortho_prob.tif").exists()
    assert (run / "segmentation" / "ortho.tif").read_bytes() == before


@pytest.mark.slow
def test_two_ranks_write_the_same_class_map(make_image, tmp_path: Path) -> None:
    img = make_image(width=900, height=640, objects=15, nodata="border")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("tile_size=128", "overlap=32")
    assert run_mgpr_inprocess(*_args(img.path, one, *common)) == 0
    cmd = mgpr_cmd(*_args(img.path, two, *common, "gpus=2", "join_timeout_s=120"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = _check_class_map(one / "segmentation" / "ortho.tif", Path(img.path))
    b = _check_class_map(two / "segmentation" / "ortho.tif", Path(img.path))
    assert np.array_equal(a, b)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tiles_missing"] == 0
    # Per-class totals from the parts' counts, each tile once: the class map's histogram
    hist = np.bincount(b[b != 255], minlength=2)
    classes = summary["classes"]
    assert {k: v["pixels"] for k, v in classes.items()} == {
        "background": hist[0],
        "bright": hist[1],
    }
    alone = json.loads((one / "summary.json").read_text())["classes"]
    for name, entry in classes.items():
        assert entry["area_m2"] == pytest.approx(alone[name]["area_m2"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "seam,overlap", [("crop", 0), ("blend", 32)], ids=["crop", "blend-overlap32"]
)
def test_killed_at_about_half_then_resumed_gives_the_same_bytes(
    make_image, tmp_path: Path, seam: str, overlap: int
) -> None:
    """SIGKILL once some chunks are published, resume: the class map's bytes equal an
    uninterrupted run's (a blended pixel mixes tiles from the killed run and the resumed one)."""
    img = make_image(width=1024, height=512, objects=12)  # 128 px tiles: 8 x 4 at overlap 0
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ("tile_size=128", f"overlap={overlap}", "batch_size=1", f"seam={seam}")
    assert run_mgpr_inprocess(*_args(img.path, ref, *common)) == 0
    planned = json.loads((ref / "summary.json").read_text())["tiles_total"]
    proc = subprocess.Popen(
        mgpr_cmd(*_args(img.path, run, *common)),
        # A chunk is published every second (test-only knob), one tile per 0.2 s.
        env=subprocess_env(MGPR_TEST_TILE_DELAY_RANK0="0.2", MGPR_TEST_CHUNK_SECONDS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
    done = 0
    while done < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            done = len(finished_tile_keys(run))
        except Exception:  # noqa: BLE001 - not written yet
            done = 0
    assert proc.poll() is None and 8 <= done < planned, "the run did not get going"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run / "segmentation" / "ortho.tif").exists()
    assert run_mgpr_inprocess(*_args(img.path, run, *common)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tiles_predicted"] == planned and summary["tiles_missing"] == 0
    a = (ref / "segmentation" / "ortho.tif").read_bytes()
    b = (run / "segmentation" / "ortho.tif").read_bytes()
    assert a == b


@pytest.mark.slow
def test_deeplabv3_random_weights_on_two_ranks(make_image, tmp_path: Path) -> None:
    img = make_image(width=200, height=150)
    run = tmp_path / "run"
    args = [
        f"input_path={img.path}",
        "model=deeplabv3",
        "weights=none",
        "tile_size=64",
        "overlap=16",
        "batch_size=2",
        "workers=0",
        "accelerator=cpu",
        "progress=false",
        "gpus=2",
        "join_timeout_s=120",
        f"output_dir={run}",
    ]
    proc = subprocess.run(
        mgpr_cmd(*args), capture_output=True, text=True, env=subprocess_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with rasterio.open(run / "segmentation" / "ortho.tif") as out:
        ids = out.read(1)
        names = json.loads(out.tags()["class_names"])
    assert len(names) == 21 and ids.shape == (150, 200)
    assert (ids < 21).all()  # every pixel classed, none nodata


@pytest.mark.slow
@pytest.mark.parametrize("model", ["reference-seg", "reference", "null"])
def test_every_task_writes_a_preview(make_image, tmp_path: Path, model: str) -> None:
    img = make_image(width=700, height=530, objects=8)
    run = tmp_path / "run"
    args = _args(img.path, run, "tile_size=256", "overlap=64", model=model)
    assert run_mgpr_inprocess(*args) == 0
    with rasterio.open(run / "preview.png") as png:  # 100 dpi: the raster's size + a title strip
        assert (png.width, png.height) == (700, 590) and png.count >= 3
        assert png.read(1).std() > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["previews"] == [str(run / "preview.png")]
    assert str(run / "preview.png") in summary["outputs"]


def test_previews_of_several_inputs_have_unique_names(make_image, tmp_path: Path) -> None:
    from mgpr.monitor.previews import write_previews

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_image("a/ortho.tif", width=300, height=200)
    b = make_image("b/ortho.tif", width=300, height=200)
    out = write_previews(tmp_path, "segmentation", [str(a.path), str(b.path)], {})
    assert [p.name for p in out] == ["preview_ortho.png", "preview_ortho_2.png"]


def test_the_summary_counts_every_class_map_of_several_inputs(
    make_image, tmp_path: Path, capsys
) -> None:
    """``records`` sums the pixels of every class map; the output line named the first map
    alone beside that total (and ``in EPSG:4326`` beside it, though class maps keep their CRS)."""
    make_image("in/a.tif", width=300, height=200, objects=3)
    make_image("in/b.tif", width=300, height=200, objects=3, origin_x=600000.0, seed=2)
    run = tmp_path / "run"
    args = segmentation_args(tmp_path / "in", run, "vectorize=true", "output_crs=EPSG:4326")
    assert run_mgpr_inprocess(*args) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((run / "summary.json").read_text())
    at = next(i for i, ln in enumerate(out) if ln.startswith("  output  "))
    segments = summary["layers"]["segments"]
    assert out[at] == (
        f"  output       2 class maps in {run / 'segmentation'}/ ({summary['records']} "
        f"class-map pixels; layer segments: {segments} in EPSG:4326)"
    )
    listed = [ln.strip() for ln in out[at + 1 : at + 1 + len(summary["outputs"])]]
    assert listed == summary["outputs"]
    assert {Path(p).name for p in listed} >= {"a.tif", "b.tif", "predictions.gpkg"}


def test_the_summary_lists_a_few_of_many_class_maps_and_counts_the_rest(
    make_image, tmp_path: Path, capsys
) -> None:
    """A folder of chips: one class map each, so the summary listed every one (20,000 lines
    for 20,000 chips); now the outputs that are no input's own, 3 of each kind and a count."""
    for i in range(12):
        make_image(f"in/c{i:02d}.tif", width=64, height=64, objects=1, seam_share=0,
                   object_max_px=16, origin_x=500000.0 + 10 * i, seed=i)  # fmt: skip
    run = tmp_path / "run"
    args = segmentation_args(tmp_path / "in", run, "vectorize=true", tile_size=64, overlap=0)
    assert run_mgpr_inprocess(*args) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((run / "summary.json").read_text())
    maps = [p for p in summary["outputs"] if Path(p).parent == run / "segmentation"]
    previews = [p for p in summary["outputs"] if Path(p).name.startswith("preview_")]
    assert len(maps) == 12 and len(previews) == 12  # previews=auto: the first 12 inputs
    at = next(i for i, ln in enumerate(out) if ln.startswith("  output  "))
    assert out[at].startswith(f"  output       12 class maps in {run / 'segmentation'}/ (")
    more = "(every path: summary.json outputs)"
    assert [ln.strip() for ln in out[at + 1 : at + 10]] == [
        str(run / "predictions.gpkg"),
        *maps[:3],
        f"... and 9 more class maps in {run / 'segmentation'}/ {more}",
        *previews[:3],
        f"... and 9 more previews in {run}/ {more}",
    ]
    assert not out[at + 10].startswith("               ")


def test_each_class_map_names_its_input(make_image, tmp_path: Path) -> None:
    """Two inputs named x.tif in two folders give x.tif and x_2.tif: summary.json
    ``outputs_by_input`` and each file's ``source`` tag say which came from which."""
    a = make_image("a/x.tif", width=300, height=200, objects=3, seed=1)
    b = make_image("b/x.tif", width=200, height=300, objects=3, seed=2)
    run = tmp_path / "run"
    paths = f"[{a.path},{b.path}]"
    args = segmentation_args(Path(paths), run, "probabilities=true")
    assert run_mgpr_inprocess(*args) == 0
    by_input = json.loads((run / "summary.json").read_text())["outputs_by_input"]
    assert set(by_input) == {str(a.path), str(b.path)}
    for img in (a, b):
        cog, prob = by_input[str(img.path)]
        assert Path(prob).name == Path(cog).name.replace(".tif", "_prob.tif")
        with rasterio.open(img.path) as src:
            shape = (src.height, src.width)
        for name in (cog, prob):
            with rasterio.open(name) as out:
                assert out.tags()["source"] == str(img.path) and out.shape == shape
    assert sorted(Path(c).name for c, _ in by_input.values()) == ["x.tif", "x_2.tif"]
