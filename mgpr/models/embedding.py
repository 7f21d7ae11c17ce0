"""ResNet-50 tile embeddings (torchvision): the 2048 pooled features before the ImageNet head.

What an embedding is for: similarity search over an orthomosaic ("find tiles like this one"),
clustering, or a small classifier trained later on the vectors without running the network
again. The features are those of the tile as the network sees it at the raster's own
resolution (no resize), after the same ImageNet normalisation as ``model=resnet50``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchvision.models import resnet50

from mgpr.models.base import Embedding, embeddings_from_features
from mgpr.models.checkpoint import load_state_dict_checked, read_checkpoint
from mgpr.models.classification import ImageNetClassifierAdapter
from mgpr.models.weights import load_torchvision, resolve_weights

logger = logging.getLogger(__name__)

#: Features per tile of the built-in embedder (ResNet-50's last stage, globally averaged).
RESNET50_FEATURES = 2048


class Float32GlobalPool(torch.nn.Module):
    """Global average pooling in float32, whatever the autocast dtype of its input.

    Under bf16 autocast a ResNet's last stage is bf16 (8 significant bits) and torchvision's
    ``AdaptiveAvgPool2d`` averages it in bf16, so every feature lands on bf16's grid (7.5,
    34.0, ...). The mean of the h x w cells taken in float32 keeps the digits the average
    gains; the cells themselves stay the run's precision (``precision=32`` for float32
    throughout).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, 1, 1) float32 means (the layout ``torch.flatten`` expects)."""
        return x.float().mean(dim=(2, 3), keepdim=True)


class ImageNetEmbeddingAdapter(ImageNetClassifierAdapter):
    """A torchvision ImageNet CNN without its head: (B, 3, H, W) -> (B, D) pooled features.

    ``prepare`` is the classifier's (ImageNet mean/std on the device, channels_last); the
    network's last layer is an ``Identity`` in place of ``fc``, so its output is the globally
    averaged last stage (ResNet-50: 2048 per tile, any tile size), averaged in float32
    (:class:`Float32GlobalPool`).
    """

    def postprocess(self, raw: Any, tile_size: int) -> list[Embedding]:  # type: ignore[override]
        """(B, D) features -> one float32 :class:`Embedding` per tile."""
        return embeddings_from_features(raw, self.name)


def build_resnet50_embed(weights: str = "DEFAULT") -> ImageNetEmbeddingAdapter:
    """Build the ResNet-50 embedder.

    Args:
        weights: ``DEFAULT`` / an ImageNet enum name (as ``model=resnet50``), ``none``
            (random), or a local checkpoint of a ResNet-50: a fine-tuned classifier (its
            ``fc`` head, of any class count, is not used and not loaded) or a backbone alone
            (self-supervised checkpoints often have no head); every other key must fit.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    name = "resnet50-embed"
    spec = resolve_weights(name, weights)
    if spec.kind == "torchvision":
        module = load_torchvision(resnet50, name, weights)
    else:
        module = resnet50(weights=None)
    module.avgpool = Float32GlobalPool()
    module.fc = torch.nn.Identity()
    if spec.kind == "file":
        assert spec.path is not None
        load_state_dict_checked(
            module, read_checkpoint(spec.path), str(weights), name, ignore_prefixes=("fc.",)
        )
    elif spec.kind == "none":
        logger.warning("%s runs with random weights (weights=none): embeddings are noise", name)
    return ImageNetEmbeddingAdapter(
        module,
        name=name,
        weights_id=spec.weights_id,
        random_weights=spec.kind == "none",
        categories=None,
        topk=0,
        task="embedding",
    )
