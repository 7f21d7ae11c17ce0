"""Model adapters: built-in torchvision models, a reference detector, a null model, user code.

Use :func:`build_model` (``model=`` + ``weights=``) to get a :class:`ModelAdapter`; see
:mod:`mgpr.models.base` for the interface and :mod:`mgpr.models.weights` for weights and the
download cache. No Lightning here: the pipeline wraps the adapter.
"""

from mgpr.models.base import (
    Classification,
    Detections,
    ModelAdapter,
    Task,
)
from mgpr.models.registry import KNOWN_MODELS, build_model, is_import_path
from mgpr.models.weights import (
    fetch_weights,
    file_weights_id,
    load_checkpoint,
    weights_cache_file,
    weights_cached,
)

__all__ = [
    "KNOWN_MODELS",
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
