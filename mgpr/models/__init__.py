"""Model adapters: built-in torchvision models, reference models, a null model, user code.

Use :func:`build_model` (``model=`` + ``weights=``) to get a :class:`ModelAdapter`; see
:mod:`mgpr.models.registry` for the table of built-in models, :mod:`mgpr.models.base` for the
interface and :mod:`mgpr.models.weights` for weights and the download cache. No Lightning here:
the pipeline wraps the adapter.

The names below are imported on first use (PEP 562), so reading the model table
(``mgpr.models.registry``) does not import torch: ``mgpr --help`` and a misspelt ``model=``
answer in well under a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mgpr.models.base import Classification, ClassMap, Detections, ModelAdapter, Task
    from mgpr.models.registry import KNOWN_MODELS, MODELS, build_model, is_import_path
    from mgpr.models.weights import (
        fetch_weights,
        file_weights_id,
        load_checkpoint,
        weights_cache_file,
        weights_cached,
    )

#: Public name -> the module that defines it.
_HOMES = {
    "ClassMap": "mgpr.models.base",
    "Classification": "mgpr.models.base",
    "Detections": "mgpr.models.base",
    "ModelAdapter": "mgpr.models.base",
    "Task": "mgpr.models.base",
    "KNOWN_MODELS": "mgpr.models.registry",
    "MODELS": "mgpr.models.registry",
    "build_model": "mgpr.models.registry",
    "is_import_path": "mgpr.models.registry",
    "fetch_weights": "mgpr.models.weights",
    "file_weights_id": "mgpr.models.weights",
    "load_checkpoint": "mgpr.models.weights",
    "weights_cache_file": "mgpr.models.weights",
    "weights_cached": "mgpr.models.weights",
}

__all__ = [
    "KNOWN_MODELS",
    "MODELS",
    "ClassMap",
    "Classification",
    "Detections",
    "ModelAdapter",
    "Task",
    "build_model",
    "fetch_weights",
    "file_weights_id",
    "is_import_path",
    "load_checkpoint",
    "weights_cache_file",
    "weights_cached",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mgpr.models' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
