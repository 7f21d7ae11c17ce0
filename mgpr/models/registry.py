"""The one table of built-in models (``model=`` names) and :func:`build_model`.

Every place that needs a model name reads :data:`MODELS`: the ``model=`` check, ``mgpr --help``,
``mgpr-fetch-weights``, ``mgpr-doctor``, the rank-0-downloads-first wait and the weights lookup
(:mod:`mgpr.models.weights` asks torchvision for the weights enum of ``torchvision_builder``).
Adding a model is one :class:`ModelEntry`: its builder is named by import path and imported only
when that model is built, so this module imports neither torch nor torchvision (``mgpr --help``
and a misspelt ``model=`` stay fast). Any other ``model=`` value with ``:`` or ``.`` is user code
(:mod:`mgpr.models.custom`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mgpr.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from mgpr.models.base import ModelAdapter

#: The build options :func:`build_model` may pass on (an entry names those its builder takes).
BuildOption = Literal[
    "topk", "score_threshold", "native_resolution", "tile_size", "max_detections", "probabilities"
]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One built-in model.

    Attributes:
        name: the ``model=`` value, lower case.
        task: what its outputs are (``classification``, ``detection``, ...).
        builder: ``"module:function"`` called as ``function(weights, **options)``.
        options: the build options (:data:`BuildOption`) the builder takes, by keyword.
        torchvision_builder: the torchvision model builder name whose weights enum lists the
            downloadable weights (``torchvision.models.get_model_weights(name)``); None for a
            model without downloadable weights.
        summary: one line for ``mgpr --help`` and the README.
    """

    name: str
    task: str
    builder: str
    options: tuple[BuildOption, ...] = ()
    torchvision_builder: str | None = None
    summary: str = ""

    @property
    def downloadable(self) -> bool:
        """True when the model has torchvision weights to download (``mgpr-fetch-weights``)."""
        return self.torchvision_builder is not None


_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        "resnet50",
        "classification",
        "mgpr.models.classification:build_resnet50",
        ("topk",),
        torchvision_builder="resnet50",
        summary="torchvision ResNet-50, ImageNet classes per tile",
    ),
    ModelEntry(
        "resnet50-embed",
        "embedding",
        "mgpr.models.embedding:build_resnet50_embed",
        torchvision_builder="resnet50",
        summary="torchvision ResNet-50 without its head, 2048 ImageNet features per tile",
    ),
    ModelEntry(
        "fasterrcnn",
        "detection",
        "mgpr.models.detection:build_fasterrcnn",
        ("score_threshold", "native_resolution", "tile_size", "max_detections"),
        torchvision_builder="fasterrcnn_resnet50_fpn",
        summary="torchvision Faster R-CNN ResNet-50 FPN, COCO boxes",
    ),
    ModelEntry(
        "maskrcnn",
        "detection",
        "mgpr.models.detection:build_maskrcnn",
        ("score_threshold", "native_resolution", "tile_size", "max_detections"),
        torchvision_builder="maskrcnn_resnet50_fpn",
        summary="torchvision Mask R-CNN ResNet-50 FPN, COCO objects outlined by their masks",
    ),
    ModelEntry(
        "reference",
        "detection",
        "mgpr.models.reference:build_reference",
        ("max_detections",),
        summary="exact detector of the demo image's bright rectangles",
    ),
    ModelEntry(
        "deeplabv3",
        "segmentation",
        "mgpr.models.segmentation:build_deeplabv3",
        ("probabilities",),
        torchvision_builder="deeplabv3_resnet50",
        summary="torchvision DeepLabV3 ResNet-50, a class per pixel (VOC classes)",
    ),
    ModelEntry(
        "fcn",
        "segmentation",
        "mgpr.models.segmentation:build_fcn",
        ("probabilities",),
        torchvision_builder="fcn_resnet50",
        summary="torchvision FCN ResNet-50, a class per pixel (VOC classes)",
    ),
    ModelEntry(
        "lraspp",
        "segmentation",
        "mgpr.models.segmentation:build_lraspp",
        ("probabilities",),
        torchvision_builder="lraspp_mobilenet_v3_large",
        summary="torchvision LR-ASPP MobileNetV3-Large, a fast class per pixel (VOC classes)",
    ),
    ModelEntry(
        "reference-seg",
        "segmentation",
        "mgpr.models.segmentation:build_reference_seg",
        ("probabilities",),
        summary="exact segmenter of the demo image's bright pixels (class 1 = bright)",
    ),
    ModelEntry(
        "null",
        "classification",
        "mgpr.models.null:build_null",
        summary="mean brightness per tile at near-zero cost (data-path tests)",
    ),
)

#: Built-in models by ``model=`` name, in the order ``mgpr --help`` lists them.
MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}

#: Built-in model names accepted by ``model=``.
KNOWN_MODELS: tuple[str, ...] = tuple(MODELS)

#: ``model=`` when unset and an ``input_path`` is given.
DEFAULT_MODEL = "resnet50"

#: ``model=`` when unset in the quick start (no ``input_path``): checks itself exactly.
DEMO_MODEL = "reference"


def downloadable_models() -> tuple[str, ...]:
    """Names of the built-in models with torchvision weights to download."""
    return tuple(entry.name for entry in _ENTRIES if entry.downloadable)


#: Torch seed of a built-in model's random weights (``weights=none``): one network everywhere.
RANDOM_WEIGHTS_SEED = 0

#: Boxes per tile a built-in detector keeps when ``max_detections`` is unset.
DEFAULT_MAX_DETECTIONS = 100


def max_detections_for(name: str, max_detections: int | None) -> int | None:
    """The per-tile box cap a run of ``model=name`` works with.

    The key when set; unset, :data:`DEFAULT_MAX_DETECTIONS` for a built-in model and None (no
    cap: every box it returns) for a user's model.
    """
    if max_detections is not None:
        return max_detections
    return DEFAULT_MAX_DETECTIONS if model_entry(name) is not None else None


def model_entry(name: str) -> ModelEntry | None:
    """The table entry of a built-in model name (surrounding spaces ignored), or None."""
    return MODELS.get(name.strip())


def is_import_path(name: str) -> bool:
    """True when ``model=`` names user code: contains ':' or is a dotted name not built in."""
    return ":" in name or ("." in name and name not in MODELS)


def unknown_model_error(name: str) -> ModelError:
    """The one-line error for a ``model=`` value that is neither built in nor an import path."""
    names = ", ".join(KNOWN_MODELS)
    if name.strip().lower() == "none":
        return ModelError(
            "model=none is not a model; use model=null for the near-zero-cost model, "
            f"or one of {names}"
        )
    close = difflib.get_close_matches(name.strip().lower(), KNOWN_MODELS, n=1, cutoff=0.5)
    hint = f"did you mean model={close[0]}? " if close else ""
    return ModelError(
        f"model={name} is not a known model; {hint}use one of {names} "
        "or an import path like my_pkg.my_module:build."
    )


def check_model_name(name: str | None) -> None:
    """Refuse an unknown ``model=`` before any heavy import (the CLI calls this first).

    Raises:
        ModelError: ``name`` is neither a built-in model nor an import path.
    """
    if name is not None and model_entry(name) is None and not is_import_path(name.strip()):
        raise unknown_model_error(name)


def _check_options(
    topk: int, score_threshold: float, tile_size: int, max_detections: int | None
) -> None:
    if not isinstance(topk, int) or topk < 1:
        raise ConfigError(f"topk={topk} must be an integer >= 1; set topk=5, for example.")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError(
            f"score_threshold={score_threshold} must lie in [0, 1]; set score_threshold=0.05, "
            "for example."
        )
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ConfigError(f"tile_size={tile_size} must be an integer >= 1; set tile_size=512.")
    if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 1):
        raise ConfigError(
            f"max_detections={max_detections} must be an integer >= 1; set max_detections=100, "
            "for example."
        )


def build_model(
    name: str,
    weights: str = "DEFAULT",
    *,
    topk: int = 5,
    score_threshold: float = 0.05,
    native_resolution: bool = True,
    tile_size: int = 512,
    max_detections: int | None = None,
    probabilities: bool = False,
) -> ModelAdapter:
    """Build the adapter for ``model=name`` on the CPU, in eval mode, gradients off.

    Args:
        name: one of :data:`KNOWN_MODELS`, or an import path ``pkg.module:build`` (runs that
            code, see :mod:`mgpr.models.custom`).
        weights: ``DEFAULT``, a torchvision weights name, ``none`` or a local checkpoint path
            (see :mod:`mgpr.models.weights`); passed unchanged to a user's ``build``.
        topk: classes kept per tile (classification), >= 1.
        score_threshold: minimum box score kept (detection), in [0, 1].
        native_resolution: fasterrcnn only: run tiles at their size instead of resizing to
            800 px (see :func:`mgpr.models.detection.build_fasterrcnn`).
        tile_size: tile edge in pixels, >= 1.
        max_detections: detection: boxes kept per tile at most (fasterrcnn: best scores,
            reference: largest objects), >= 1; None = :data:`DEFAULT_MAX_DETECTIONS`. A user's
            model is not limited here: the run caps what it returns
            (:class:`~mgpr.run.module.InferenceModule`).
        probabilities: segmentation: also return uint8 per-class probabilities per tile.

    Raises:
        ConfigError: topk, score_threshold, tile_size or max_detections out of range.
        ModelError: unknown name (with the closest known one), bad import path or weights,
            weights not downloadable.
    """
    _check_options(topk, score_threshold, tile_size, max_detections)
    name = name.strip()
    options: dict[str, Any] = {
        "topk": topk,
        "score_threshold": score_threshold,
        "native_resolution": native_resolution,
        "tile_size": tile_size,
        "max_detections": max_detections if max_detections is not None else DEFAULT_MAX_DETECTIONS,
        "probabilities": probabilities,
    }
    entry = model_entry(name)
    if entry is not None:
        module_name, _, attr = entry.builder.partition(":")
        # Imported here: each builder pulls in only what it needs (torchvision, scipy, ...).
        builder = getattr(importlib.import_module(module_name), attr)
        if str(weights).strip().lower() != "none":
            adapter: ModelAdapter = builder(weights, **{k: options[k] for k in entry.options})
            return adapter
        import torch

        # Random weights (weights=none) are one network, the same on every rank and in every
        # run of the job: unseeded, each rank drew its own, so one run's tiles came from
        # several networks (and a resume added another). The caller's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            adapter = builder(weights, **{k: options[k] for k in entry.options})
        return adapter
    if is_import_path(name):
        from mgpr.models.custom import build_custom

        return build_custom(
            name,
            weights,
            topk=topk,
            score_threshold=score_threshold,
            tile_size=tile_size,
            probabilities=probabilities,
        )
    raise unknown_model_error(name)
