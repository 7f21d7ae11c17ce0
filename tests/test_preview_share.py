"""Previews under a spread merge: the finalising rank draws, rank 0 renames, never a stale one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio

from mgpr.monitor.previews import PREVIEW_STASH, stash_path, write_previews, write_share_previews
from mgpr.outputs.vector import FeatureBatch
from mgpr.testimage import TestImageResult


def _boxes(path: str) -> FeatureBatch:
    with rasterio.open(path) as src:
        t = src.transform
    corners = [(40, 40, 200, 160), (300, 220, 420, 380)]
    rings = []
    for c0, r0, c1, r1 in corners:
        pts = [t * (c0, r0), t * (c1, r0), t * (c1, r1), t * (c0, r1), t * (c0, r0)]
        rings.append(pts)
    return FeatureBatch(
        np.asarray(rings, np.float64), {"label": np.array(["car", "tree"], dtype=object)}
    )


def test_finalising_rank_draws_and_rank0_only_renames(
    make_image: Callable[..., TestImageResult], tmp_path: Path
) -> None:
    a = make_image("a.tif", width=500, height=400, seed=1)
    b = make_image("b.tif", width=450, height=420, seed=2)
    run = tmp_path / "run"
    order = [str(a.path), str(b.path)]
    features = {str(b.path): _boxes(str(b.path))}  # what rank 1's finalise published
    write_share_previews(run, "detection", order, [str(b.path)], features=features)
    stashed = stash_path(run, 1).read_bytes()
    # Rank 0 has no features for b in memory: only the stash can give b its boxes.
    written = write_previews(run, "detection", order, {}, use_stash=True)
    assert written == [run / "preview_a.png", run / "preview_b.png"]
    assert (run / "preview_b.png").read_bytes() == stashed
    assert (run / "preview_a.png").read_bytes() != stashed
    assert not (run / PREVIEW_STASH).exists()


def test_a_stash_is_ignored_and_cleared_without_a_spread_merge(
    make_image: Callable[..., TestImageResult], tmp_path: Path
) -> None:
    a = make_image("a.tif", width=300, height=300)
    run = tmp_path / "run"
    stale = stash_path(run, 0)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a killed run")
    assert write_previews(run, "detection", [str(a.path)], {}) == [run / "preview.png"]
    assert (run / "preview.png").read_bytes().startswith(b"\x89PNG")
    assert not (run / PREVIEW_STASH).exists()


def test_previews_auto_caps_the_count_all_and_none_as_asked(
    make_image: Callable[..., TestImageResult], tmp_path: Path, monkeypatch, caplog
) -> None:
    """A run over many small rasters gets AUTO_PREVIEWS quicklooks, not one PNG per input."""
    import logging

    import mgpr.monitor.previews as previews

    monkeypatch.setattr(previews, "AUTO_PREVIEWS", 2)
    order = [str(make_image(f"t{i}.tif", width=64, height=64, seed=i).path) for i in range(3)]
    run = tmp_path / "run"
    features = {order[2]: _boxes(order[2])}  # t2 is past the cap
    write_share_previews(run, "detection", order, [order[2]], "auto", features=features)
    assert not stash_path(run, 2).exists()
    with caplog.at_level(logging.INFO, logger="mgpr.monitor.previews"):
        written = write_previews(run, "detection", order, {}, use_stash=True, mode="auto")
    assert [p.name for p in written] == ["preview_t0.png", "preview_t1.png"]
    assert "previews of the first 2 of 3 inputs only; previews=all" in caplog.text
    for p in written:
        p.unlink()
    written = write_previews(run, "detection", order, {}, mode="all")
    assert [p.name for p in written] == [f"preview_t{i}.png" for i in range(3)]
    assert write_previews(run, "detection", order, {}, mode="none") == []
