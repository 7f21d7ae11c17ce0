"""Model names -> adapters: the built-ins and user import paths."""

from __future__ import annotations

import difflib

from mgpr.errors import ConfigError, ModelError
from mgpr.models.base import ModelAdapter

#: Built-in model names accepted by ``model=``.
KNOWN_MODELS: tuple[str, ...] = ("resnet50", "fasterrcnn", "reference", "null")


def is_import_path(name: str) -> bool:
    """True when ``model=`` names user code: contains ':' or is a dotted name not built in."""
    return ":" in name or ("." in name and name not in KNOWN_MODELS)


def build_model(
    name: str,
    weights: str = "DEFAULT",
    *,
    topk: int = 5,
    score_threshold: float = 0.05,
    native_resolution: bool = True,
    tile_size: int = 512,
    max_detections: int = 100,
) -> ModelAdapter:
    """Build the adapter for ``model=name`` on the CPU, in eval mode, gradients off.

    Args:
        name: one of :data:`KNOWN_MODELS`, or an import path ``pkg.module:build`` (runs that
            code, see :mod:`mgpr.models.custom`).
        weights: ``DEFAULT``, a torchvision enum name, ``none`` or a local checkpoint path (see
            :mod:`mgpr.models.weights`); passed unchanged to a user's ``build``.
        topk: classes kept per tile (classification), >= 1.
        score_threshold: minimum box score kept (detection), in [0, 1].
        native_resolution: fasterrcnn only: run tiles at their size instead of resizing to
            800 px (see :func:`mgpr.models.detection.build_fasterrcnn`).
        tile_size: tile edge in pixels, >= 1.
        max_detections: detection: boxes kept per tile at most (fasterrcnn: best scores,
            reference: largest objects), >= 1. A user's model is not limited.

    Raises:
        ConfigError: topk, score_threshold, tile_size or max_detections out of range.
        ModelError: unknown name (with the closest known one), bad import path or weights,
            weights not downloadable.
    """
    if not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk={topk} must be an integer >= 1; set topk=5, for example.")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError(
            f"score_threshold={score_threshold} must lie in [0, 1]; set score_threshold=0.05, "
            "for example."
        )
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ConfigError(f"tile_size={tile_size} must be an integer >= 1; set tile_size=512.")
    if not isinstance(max_detections, int) or max_detections < 1:
        raise ConfigError(
            f"max_detections={max_detections} must be an integer >= 1; set max_detections=100, "
            "for example."
        )
    name = name.strip()
    # Imports are local: each builder pulls in only what it needs.
    if name == "resnet50":
        from mgpr.models.classification import build_resnet50

        return build_resnet50(weights, topk=topk)
    if name == "fasterrcnn":
        from mgpr.models.detection import build_fasterrcnn

        return build_fasterrcnn(
            weights,
            score_threshold=score_threshold,
            native_resolution=native_resolution,
            tile_size=tile_size,
            max_detections=max_detections,
        )
    if name == "reference":
        from mgpr.models.reference import build_reference

        return build_reference(weights, max_detections=max_detections)
    if name == "null":
        from mgpr.models.null import build_null

        return build_null(weights)
    if is_import_path(name):
        from mgpr.models.custom import build_custom

        return build_custom(
            name, weights, topk=topk, score_threshold=score_threshold, tile_size=tile_size
        )
    close = difflib.get_close_matches(name.lower(), KNOWN_MODELS, n=1, cutoff=0.5)
    hint = f"did you mean model={close[0]}? " if close else ""
    raise ModelError(
        f"model={name} is not a known model; {hint}use one of {', '.join(KNOWN_MODELS)} "
        "or an import path like my_pkg.my_module:build."
    )
