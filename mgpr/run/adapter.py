"""Building the model adapter on a rank: rank 0 downloads weights, the others load the cache."""

from __future__ import annotations

from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import MgprError, ModelError
from mgpr.run.coordination import wait_for_rank0


def build_adapter(cfg: PredictConfig, model_name: str, rank: int) -> Any:
    """Build the model; with downloads, rank 0 fetches and the other ranks wait for the file."""
    from mgpr.models import build_model
    from mgpr.models.registry import model_entry
    from mgpr.models.weights import weights_cache_file, weights_cached

    kwargs = dict(
        topk=cfg.topk,
        score_threshold=cfg.score_threshold,
        native_resolution=cfg.native_resolution,
        tile_size=cfg.tile_size,
        max_detections=cfg.max_detections,
    )
    entry = model_entry(model_name)
    if rank != 0 and entry is not None and entry.downloadable:
        try:
            target = weights_cache_file(model_name, cfg.weights)
        except MgprError:
            target = None
        if target is not None and not wait_for_rank0(
            lambda: weights_cached(model_name, cfg.weights), cfg.join_timeout_s, poll_s=1.0
        ):
            raise ModelError(
                f"rank {rank} waited {cfg.join_timeout_s} s for rank 0 to download "
                f"weights={cfg.weights} for {model_name} into {target.parent}; "
                f"pre-fetch them with `mgpr-fetch-weights {model_name}`"
            )
    adapter = build_model(model_name, cfg.weights, **kwargs)
    from mgpr.tasks import TASKS

    if adapter.task not in TASKS:
        # A user model may declare segmentation already; its class-map writer is not in yet.
        raise ModelError(
            f"model={model_name} is a {adapter.task} model; this version writes only "
            f"{' and '.join(sorted(TASKS))} outputs; use such a model (e.g. model=resnet50)."
        )
    return adapter
