"""The quick start's input: a synthetic orthomosaic with planted objects, made once per run."""

from __future__ import annotations

import logging
from pathlib import Path

from mgpr.conf.schema import PredictConfig
from mgpr.errors import RankJoinError
from mgpr.run.coordination import wait_for_rank0

log = logging.getLogger("mgpr")

DEMO_TILE_SIZE = 512
DEMO_OVERLAP = 64


def apply_demo_defaults(cfg: PredictConfig, explicit: set[str]) -> bool:
    """Set the quick start's keys the user left unset; True when this is the quick start.

    512 px tiles, 64 px overlap, and the reference detector's random weights. Shared by the
    run and ``mgpr --cfg job``, so the printed config is the one the run gets (it printed
    overlap 0, and a file saved from it ran without overlap: 16 tiles, 0 objects on seams).
    """
    demo = cfg.input_path is None and not cfg.use_fake_data
    if demo:
        if "tile_size" not in explicit:
            cfg.tile_size = DEMO_TILE_SIZE
        if "overlap" not in explicit:
            cfg.overlap = DEMO_OVERLAP
        if cfg.model is None and "weights" not in explicit:
            cfg.weights = "none"
    return demo


def demo_image(
    run_dir: Path, cfg: PredictConfig, rank: int, tile_size: int, overlap: int
) -> tuple[Path, Path | None]:
    """The quick start's synthetic orthomosaic (with planted objects), made once per run dir.

    Rank 0 writes it (to a temporary name, then renamed: image first, truth second); the other
    ranks wait for both files. Each rank writing its own copy would give each file its own
    modification time, which is part of the run's fingerprint: under ``srun`` ranks start
    together, and a rank reading rank 0's ``run.json`` would take the run for another one.

    Raises:
        RankJoinError: rank 0 did not write the image within ``join_timeout_s``.
    """
    from mgpr.testimage import TestImageSpec, write_test_image

    path = run_dir / "demo" / "demo_ortho.tif"
    truth = path.with_name(f"{path.stem}_truth.gpkg")

    def ready() -> bool:
        return path.exists() and (cfg.objects == 0 or truth.exists())

    if rank != 0 and not wait_for_rank0(ready, cfg.join_timeout_s, poll_s=0.2):
        raise RankJoinError(
            f"rank {rank} waited join_timeout_s={cfg.join_timeout_s} s for rank 0 to "
            f"write the demo image {path}; rank 0 failed or never started: read "
            f"{run_dir}/logs/rank0.log (or pass input_path=)"
        )
    if ready():
        return path, truth if truth.exists() else None
    log.info(
        "no input_path: making a synthetic %dx%d orthomosaic with %d planted objects "
        "in %s (the quick start's pipeline check)",
        cfg.image_size,
        cfg.image_size,
        cfg.objects,
        path,
    )
    # Objects on seams must fit inside the overlap to be seen whole by one tile; with a small
    # overlap the demo plants objects away from seams only.
    on_seams = overlap >= 12
    spec = TestImageSpec(
        width=cfg.image_size,
        height=cfg.image_size,
        objects=cfg.objects,
        tile_size=tile_size,
        overlap=overlap,
        seed=cfg.seed,
        object_max_px=min(40, overlap) if on_seams else 40,
        seam_share=0.5 if on_seams else 0.0,
    )
    result = write_test_image(path, spec)
    return result.path, result.truth_path
