"""Faster R-CNN object detector (torchvision ``fasterrcnn_resnet50_fpn``, COCO classes)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
)

from mgpr.models.base import Detections, ModelAdapter, detections_from_dicts
from mgpr.models.weights import build_torchvision_model

#: Key of the Faster R-CNN class head; its first dimension is the class count (background incl.).
_CLS_HEAD = "roi_heads.box_predictor.cls_score.weight"


class TorchvisionDetectorAdapter(ModelAdapter):
    """A torchvision ``GeneralizedRCNN`` detector: list of (C, H, W) float [0, 1] -> list of dicts.

    The model normalises (ImageNet mean/std) and resizes inside its own
    ``GeneralizedRCNNTransform``, on whatever device it runs on, so ``prepare`` only divides by
    255 on the device. Boxes come back in the input tile's pixel coordinates whatever the
    internal resize was.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        weights_id: str,
        random_weights: bool,
        categories: tuple[str, ...] | None,
        score_threshold: float,
        in_bands: int = 3,
    ) -> None:
        super().__init__(
            name=name,
            task="detection",
            categories=categories,
            in_bands=in_bands,
            random_weights=random_weights,
            weights_id=weights_id,
            module=module,
        )
        self.score_threshold = score_threshold

    def prepare(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Scale uint8 tiles to [0, 1] on their device.

        Args:
            images: (B, 3, H, W) uint8 on the device.

        Returns:
            B tensors (3, H, W) float32 in [0, 1] (views of one batched tensor).
        """
        return list(images.to(torch.float32).div_(255.0).unbind(0))

    def postprocess(self, raw: Any, tile_size: int) -> list[Detections]:
        """Move boxes/scores/labels to the CPU, keeping ``score >= score_threshold``.

        Boxes are ``xyxy`` in tile pixel corner coordinates, ``0..tile_size`` (torchvision clips
        them to the image and maps them back from its internal resize).
        """
        return detections_from_dicts(raw, self.score_threshold)


def build_fasterrcnn(
    weights: str = "DEFAULT",
    *,
    score_threshold: float = 0.05,
    native_resolution: bool = True,
    tile_size: int = 512,
) -> TorchvisionDetectorAdapter:
    """Build the torchvision Faster R-CNN ResNet-50 FPN detector adapter.

    Args:
        weights: ``DEFAULT`` (= ``COCO_V1``), ``COCO_V1`` (bare or as
            ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``), ``none`` (random; the ImageNet
            backbone is not downloaded either), or a local checkpoint path (class count read
            from its box predictor).
        score_threshold: boxes scoring below are dropped (also the model's ``box_score_thresh``).
        native_resolution: True runs each tile at its native size (``min_size = max_size =
            tile_size``, so the internal transform does not resize): fastest, and the ground
            sample distance is what the imagery has. False keeps torchvision's default resize
            to a shorter side of 800 px (longer side at most 1333): a 512 px tile becomes
            800 px, (800 / 512)^2 = 2.4x the pixels and roughly that much more compute, a
            256 px tile (800 / 256)^2 = 9.8x; it helps recall of objects that are small
            compared with the COCO scale the weights were trained at.
        tile_size: tile edge in pixels (used when ``native_resolution``).

    Categories: the COCO names of the weights' meta (91 entries with ``__background__`` and
    ``N/A`` gaps, indexed by label id); with ``none`` or a 91-class checkpoint the ``DEFAULT``
    names, otherwise None.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    kwargs: dict[str, Any] = {"weights_backbone": None, "box_score_thresh": score_threshold}
    if native_resolution:
        kwargs.update(min_size=tile_size, max_size=tile_size)
    spec, module, categories = build_torchvision_model(
        "fasterrcnn",
        weights,
        fasterrcnn_resnet50_fpn,
        _CLS_HEAD,
        tuple(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]),
        "detections",
        **kwargs,
    )
    return TorchvisionDetectorAdapter(
        module,
        name="fasterrcnn",
        weights_id=spec.weights_id,
        random_weights=spec.kind == "none",
        categories=categories,
        score_threshold=score_threshold,
    )
