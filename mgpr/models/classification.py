"""ResNet-50 tile classifier (torchvision), fed [0, 1] tiles normalised on the device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.models import ResNet50_Weights, resnet50

from mgpr.models.base import (
    ChannelNormaliser,
    Classification,
    ModelAdapter,
    Task,
    classifications_from_logits,
)
from mgpr.models.weights import build_torchvision_model

#: ImageNet channel statistics (RGB) of the torchvision classification weights, in [0, 1] units.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ImageNetClassifierAdapter(ModelAdapter):
    """A torchvision ImageNet-style CNN classifier: (B, 3, H, W) -> (B, K) logits.

    ``prepare`` normalises the scaled float32 [0, 1] tiles on the device as ``(x - mean) / std``
    per band, in channels_last layout (the memory format cuDNN's convolutions prefer; the module is
    converted too). Tiles are not resized: a 512 px tile is classified at 512 px, which keeps the
    ground sample distance; ImageNet models were trained at 224 px, so objects look smaller
    to them than in their training data.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        weights_id: str,
        random_weights: bool,
        categories: tuple[str, ...] | None,
        topk: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        task: Task = "classification",
    ) -> None:
        super().__init__(
            name=name,
            task=task,
            categories=categories,
            in_bands=len(mean),
            random_weights=random_weights,
            weights_id=weights_id,
            module=module.to(memory_format=torch.channels_last),
        )
        self.topk = topk
        self._normalise = ChannelNormaliser(mean, std)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """``(x - mean) / std`` with the given per-band statistics instead of ImageNet's."""
        self._check_band_count(mean)
        self._normalise = ChannelNormaliser(mean, std)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise scaled tiles on their device.

        Args:
            images: (B, 3, H, W) float32 in [0, 1] on the device (may be changed in place).

        Returns:
            (B, 3, H, W) float32, channels_last, ``(x - mean) / std``.
        """
        return self._normalise(images.contiguous(memory_format=torch.channels_last))

    def postprocess(self, raw: Any, tile_size: int) -> list[Classification]:
        """Softmax over (B, K) logits, keep the ``topk`` best classes per tile (best first)."""
        return classifications_from_logits(raw, self.topk)


def build_resnet50(weights: str = "DEFAULT", *, topk: int = 5) -> ImageNetClassifierAdapter:
    """Build the torchvision ResNet-50 classifier adapter.

    Args:
        weights: ``DEFAULT`` (= ``IMAGENET1K_V2``), ``IMAGENET1K_V1``/``IMAGENET1K_V2`` (bare or
            as ``ResNet50_Weights.<name>``), ``none`` (random), or a local checkpoint path. A
            checkpoint's class count is read from its ``fc.weight``, so fine-tuned heads load.
        topk: classes kept per tile.

    Categories: the ImageNet names from the weights' meta. With ``none`` or a checkpoint with
    1000 classes the ``DEFAULT`` enum's ImageNet names are used (the output schema stays that of
    a real run; ``random_weights`` says the scores mean nothing); with another class count None.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    spec, module, categories = build_torchvision_model(
        "resnet50",
        weights,
        resnet50,
        "fc.weight",
        tuple(ResNet50_Weights.DEFAULT.meta["categories"]),
        "predictions",
    )
    return ImageNetClassifierAdapter(
        module,
        name="resnet50",
        weights_id=spec.weights_id,
        random_weights=spec.kind == "none",
        categories=categories,
        topk=topk,
    )
