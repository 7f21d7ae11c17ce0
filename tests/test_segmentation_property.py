"""Property: for ANY raster shape, tiling, seam, rank split and chunking, the assembled class
map is the per-pixel truth, each pixel from published parts, nodata exactly where invalid.

No model and no Lightning: each tile's ClassMap is cut from a random per-pixel truth (classes
and validity are properties of the raster's pixels, so every tile that sees a pixel agrees on
it, as the reference segmenter's tiles do), written through the segmentation task's own part
payload by 1-3 "ranks" in random chunks (a tile may even be published twice), then assembled
by the task from the ledger, as the merge does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpr.geo.raster import describe_raster
from mgpr.geo.tiling import plan_tiles
from mgpr.models.base import ClassMap
from mgpr.outputs.ledger import build_ledger
from mgpr.outputs.parts import PartWriter
from mgpr.tasks import get_task
from mgpr.tasks.base import TaskContext, TileOutcome
from mgpr.testimage import TestImageSpec, write_test_image

CLASSES = ("background", "road", "water")


def _cut(a: np.ndarray, r0: int, c0: int, size: int, fill: int) -> np.ndarray:
    """The (size, size) window of ``a`` at (r0, c0), padded with ``fill`` past the edges."""
    out = np.full((size, size), fill, dtype=a.dtype)
    part = a[r0 : r0 + size, c0 : c0 + size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


@settings(
    max_examples=15,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_any_tiling_assembles_the_truth(tmp_path: Path, data: st.DataObject) -> None:
    height = data.draw(st.integers(30, 200), label="height")
    width = data.draw(st.integers(30, 200), label="width")
    tile = data.draw(st.integers(16, 80), label="tile_size")
    seam = data.draw(st.sampled_from(["crop", "blend"]), label="seam")
    overlap = data.draw(st.integers(0 if seam == "crop" else 2, tile // 2), label="overlap")
    probabilities = seam == "blend" or data.draw(st.booleans(), label="probabilities")
    ranks = data.draw(st.integers(1, 3), label="ranks")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)

    case = tmp_path / f"case{seed}-{height}x{width}-{tile}-{overlap}-{seam}-{ranks}"
    img = write_test_image(case / "in.tif", TestImageSpec(width=width, height=height))
    info = describe_raster(str(img.path))
    truth = rng.integers(0, len(CLASSES), (height, width)).astype(np.uint8)
    valid = np.ones((height, width), np.uint8)
    r0, c0 = rng.integers(0, height), rng.integers(0, width)
    valid[r0 : r0 + rng.integers(0, height), c0 : c0 + rng.integers(0, width)] = 0  # a hole

    ctx = TaskContext(
        {info.path: info}, tile, overlap, CLASSES, probabilities=probabilities, seam=seam
    )
    task = get_task("segmentation")
    tiles = plan_tiles(info.path, info.height, info.width, tile, overlap)
    outcomes = []
    for t in tiles:
        ids = _cut(truth, t.row_off, t.col_off, tile, 0)
        probs = None
        if probabilities:
            probs = (np.arange(len(CLASSES))[:, None, None] == ids[None]).astype(np.uint8) * 255
        rec = ClassMap(ids, probs, _cut(valid, t.row_off, t.col_off, tile, 0))
        outcomes.append(TileOutcome(t, 0, "", rec))
    order = rng.permutation(len(outcomes)).tolist()
    if len(order) > 1 and rng.random() < 0.5:
        order.append(order[0])  # published twice (a resumed chunk): the ledger keeps one
    run = case / "run"
    writers = [
        PartWriter(run, r, lambda outs, sink: task.write_payload(outs, ctx, sink))
        for r in range(ranks)
    ]
    while order:
        n = int(rng.integers(1, 6))
        chunk, order = order[:n], order[n:]
        writers[int(rng.integers(0, ranks))].publish([outcomes[i] for i in chunk])

    by_key = {t.id.key(): t for t in tiles}
    ledger = build_ledger(run, by_key)
    files, totals = task.assemble(run, ledger, ctx, by_key, info.path, case / "out")
    with rasterio.open(files[0]) as out:
        assert (out.height, out.width, out.transform) == (height, width, info.transform)
        got = out.read(1)
    want = np.where(valid > 0, truth, 255)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} pixels differ, first at {bad[:3].tolist()}"
    # Per-class totals, counted tile by tile (crop: the parts' counts; blend: while blending),
    # are the final map's histogram, a tile published twice counted once.
    hist = np.bincount(got[got != 255], minlength=len(CLASSES))
    assert totals is not None
    assert {k: v["pixels"] for k, v in totals.items()} == {
        name: int(n) for name, n in zip(CLASSES, hist, strict=True) if n
    }
    pixel_m2 = abs(info.transform.a * info.transform.e)  # UTM: ground ~ grid within 0.1 %
    for entry in totals.values():
        assert entry["area_m2"] == pytest.approx(entry["pixels"] * pixel_m2, rel=2e-3)
    if probabilities:
        with rasterio.open(files[1]) as prob:
            p = prob.read()
        one_hot = (np.arange(len(CLASSES))[:, None, None] == truth[None]) * 255
        assert np.array_equal(p[:, valid > 0], one_hot[:, valid > 0])
