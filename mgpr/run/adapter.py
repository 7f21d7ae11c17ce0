"""Building the model adapter on a rank: rank 0 downloads weights, the others load the cache."""

from __future__ import annotations

import logging
from typing import Any

from mgpr.conf.schema import PredictConfig
from mgpr.errors import MgprError, ModelError
from mgpr.run.coordination import wait_for_rank0

log = logging.getLogger("mgpr")


def build_adapter(
    cfg: PredictConfig, model_name: str, rank: int, local_rank: int | None = None
) -> Any:
    """Build the model; with downloads, rank 0 fetches and the other ranks load the cache.

    ``local_rank`` is given once rank 0 has said (through the process group) that its download
    is done. A rank that still finds no file then has a cache rank 0 cannot see (a node-local
    ``TORCH_HOME``): the node's local rank 0 downloads it into that cache and the node's other
    ranks wait for it there. Without ``local_rank`` (ranks started by Lightning's launcher,
    after rank 0 built its model) the other ranks wait for rank 0's file.
    """
    from mgpr.models import build_model
    from mgpr.models.registry import model_entry
    from mgpr.models.weights import weights_cache_file, weights_cached

    kwargs = dict(
        topk=cfg.topk,
        score_threshold=cfg.score_threshold,
        native_resolution=cfg.native_resolution,
        tile_size=cfg.tile_size,
        max_detections=cfg.max_detections,
        probabilities=cfg.probabilities or cfg.seam == "blend",
    )
    entry = model_entry(model_name)
    if rank != 0 and entry is not None and entry.downloadable:
        try:
            target = weights_cache_file(model_name, cfg.weights)
        except MgprError:
            target = None
        cached = target is None or weights_cached(model_name, cfg.weights)
        if not cached and local_rank == 0:
            assert target is not None
            log.info(
                "rank %d: weights=%s for %s are not in this node's cache %s (rank 0 has them "
                "in its own): downloading them here",
                rank,
                cfg.weights,
                model_name,
                target.parent,
            )
        elif not cached and not wait_for_rank0(
            lambda: weights_cached(model_name, cfg.weights), cfg.join_timeout_s, poll_s=1.0
        ):
            assert target is not None
            who = "rank 0" if local_rank is None else "this node's local rank 0"
            raise ModelError(
                f"rank {rank} waited {cfg.join_timeout_s} s for {who} to download "
                f"weights={cfg.weights} for {model_name} into {target.parent}; "
                f"pre-fetch them with `mgpr-fetch-weights {model_name}`"
            )
    adapter = build_model(model_name, cfg.weights, **kwargs)
    if cfg.mean is not None and cfg.std is not None:
        adapter.set_normalisation(cfg.mean, cfg.std)  # a fine-tune's own statistics
    if cfg.categories is not None:
        name_categories(adapter, [str(c) for c in cfg.categories])
    from mgpr.models.tta import check_tta_refusal

    check_tta_refusal(cfg.tta, adapter.tta_refusal)
    from mgpr.tasks import get_task

    get_task(adapter.task)  # one line naming the tasks this version writes, for an unknown one
    return adapter


def name_categories(adapter: Any, names: list[str]) -> None:
    """The ``categories`` key: the model's class names replaced by the user's, one per id.

    A fine-tuned checkpoint of a built-in model knows its class count but not its names
    (``"0"``, ``"1"``, ...); a user's module may have none. The count must match where the
    model fixes it (a segmenter's class map, a classifier's or detector's known head), so a
    name never lands on the wrong class; an embedding model has no classes.

    Raises:
        ConfigError: an embedding model, an empty list, or another count than the model's.
    """
    from mgpr.errors import ConfigError
    from mgpr.models.base import classes_of_logits

    if adapter.task == "embedding":
        raise ConfigError(
            f"categories= names classes, but model={adapter.name} is an embedding model "
            "(features, no classes); unset categories"
        )
    if not names:
        raise ConfigError("categories=[] names no class; unset it or give one name per class id")
    known = adapter.categories
    if known is None and adapter.task == "classification" and hasattr(adapter, "classifier_logits"):
        logits = adapter.classifier_logits()  # a user's classifier: count it before any tile
        if logits == 1 and len(names) == 1:
            names = ["background", names[0]]  # one binary logit: the name is class 1's
        elif classes_of_logits(logits) != len(names):
            binary = " (one binary logit: name its positive class, or both)" if logits == 1 else ""
            raise ConfigError(
                f"categories= gives {len(names)} names but model={adapter.name} returns "
                f"{logits} class logit(s) per tile{binary}; give one name per class id"
            )
    if known is not None and len(known) != len(names):
        hint = " (id 0 is the background)" if adapter.task == "detection" else ""
        fix = "give one name per class id"
        if adapter.task == "detection" and len(known) == len(names) + 1:
            # a fine-tuned detector's head counts torchvision's background: the user named
            # the objects only
            fix = f"name the background first: categories=[background,{','.join(names)}]"
        raise ConfigError(
            f"categories= gives {len(names)} names but model={adapter.name} has "
            f"{len(known)} classes{hint}: {', '.join(known[:6])}"
            f"{', ...' if len(known) > 6 else ''}; {fix}"
        )
    adapter.categories = tuple(names)
