"""Segmentation models: one class per pixel (torchvision DeepLabV3, FCN, LR-ASPP; reference-seg).

Every adapter here declares ``task = "segmentation"`` and returns one
:class:`~mgpr.models.base.ClassMap` per tile: (H, W) class ids on the tile's own pixel grid,
plus (K, H, W) uint8 probabilities when built with ``probabilities=True`` (the probability
raster and blended seams need them; class ids alone cost 1 byte per pixel).

* ``deeplabv3`` / ``fcn`` / ``lraspp``: torchvision ``deeplabv3_resnet50``, ``fcn_resnet50``,
  ``lraspp_mobilenet_v3_large``. Their weights are looked up like every built-in model's
  (:func:`mgpr.models.weights.build_torchvision_model`; ``none`` runs random weights and warns),
  and the class names are the weights' meta categories (the 21 Pascal VOC classes, class 0
  ``__background__``). The networks upsample their logits to the input size themselves, so
  the class map is at tile resolution. The auxiliary head (``aux_classifier``, used only for the
  training loss) is dropped: a torchvision checkpoint that holds it still loads.
* ``reference-seg``: not trained; class 1 (``bright``) where a pixel is bright in every band by
  the reference detector's own rule (:class:`mgpr.models.reference.BrightMask`), class 0
  (``background``) elsewhere. On the synthetic test images that is exactly the planted objects'
  pixels, so a run has a known answer without any weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mgpr.models.amp import fp32
from mgpr.models.base import ClassMap, ModelAdapter, class_maps_from_logits
from mgpr.models.classification import ImageNetClassifierAdapter
from mgpr.models.reference import BRIGHT_THRESHOLD, BrightMask
from mgpr.models.weights import build_torchvision_model, require_no_weights

logger = logging.getLogger(__name__)

#: Class names of ``reference-seg`` by class id.
REFERENCE_SEG_CATEGORIES: tuple[str, str] = ("background", "bright")

#: Checkpoint keys inference does not use (the auxiliary head of the training loss).
_AUX = ("aux_classifier.",)


@dataclass(frozen=True, slots=True)
class TorchvisionSegmenter:
    """How one torchvision segmentation model is built.

    Attributes:
        name: the ``model=`` value.
        builder: the torchvision builder's name in ``torchvision.models.segmentation`` (also the
            registry's ``torchvision_builder``, whose weights enum the lookup asks for).
        head_key: state-dict key of the final 1x1 convolution, (K, F, 1, 1): a checkpoint's
            class count is its first dimension.
    """

    name: str
    builder: str
    head_key: str


SEGMENTERS: dict[str, TorchvisionSegmenter] = {
    s.name: s
    for s in (
        TorchvisionSegmenter("deeplabv3", "deeplabv3_resnet50", "classifier.4.weight"),
        TorchvisionSegmenter("fcn", "fcn_resnet50", "classifier.4.weight"),
        TorchvisionSegmenter(
            "lraspp", "lraspp_mobilenet_v3_large", "classifier.high_classifier.weight"
        ),
    )
}


class TorchvisionSegmenterAdapter(ImageNetClassifierAdapter):
    """A torchvision segmentation network: (B, 3, H, W) -> ``{"out": (B, K, H, W)}`` logits.

    ``prepare`` is the ImageNet classifiers' (the segmentation weights were trained with the
    same mean/std, channels_last on the device); tiles are not resized (the weights' own
    transform resizes to 520 px; keeping the tile size keeps the ground sample distance).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        weights_id: str,
        random_weights: bool,
        categories: tuple[str, ...] | None,
        probabilities: bool = False,
    ) -> None:
        super().__init__(
            module,
            name=name,
            weights_id=weights_id,
            random_weights=random_weights,
            categories=categories,
            topk=1,
            task="segmentation",
        )
        self.probabilities = probabilities

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The (B, K, H, W) logits (the ``out`` entry of torchvision's output dict)."""
        out = self._network(inputs)
        return out["out"] if isinstance(out, dict) else out

    def postprocess(self, raw: Any, tile_size: int) -> list[ClassMap]:  # type: ignore[override]
        """Argmax per pixel (and uint8 probabilities if asked), one :class:`ClassMap` per tile."""
        return class_maps_from_logits(raw, self.probabilities)


def _builder(name: str) -> Callable[..., torch.nn.Module]:
    import torchvision.models.segmentation as tv_seg

    return getattr(tv_seg, SEGMENTERS[name].builder)  # type: ignore[no-any-return]


def build_torchvision_segmenter(
    name: str, weights: str = "DEFAULT", *, probabilities: bool = False
) -> TorchvisionSegmenterAdapter:
    """Build ``deeplabv3``, ``fcn`` or ``lraspp`` for any ``weights`` value.

    Args:
        name: a key of :data:`SEGMENTERS`.
        weights: ``DEFAULT`` (= ``COCO_WITH_VOC_LABELS_V1``), that name bare or qualified,
            ``none`` (random, warned) or a local checkpoint (its class count from the head).
        probabilities: also return per-class uint8 probabilities per tile.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    from torchvision.models import get_model_weights

    seg = SEGMENTERS[name]
    builder = _builder(name)
    default = get_model_weights(seg.builder).DEFAULT  # type: ignore[attr-defined]
    spec, module, categories = build_torchvision_model(
        name,
        weights,
        builder,
        seg.head_key,
        tuple(default.meta["categories"]),
        "class maps",
        ignore_prefixes=_AUX,
        weights_backbone=None,  # weights=none must not download the ImageNet backbone
    )
    if getattr(module, "aux_classifier", None) is not None:
        module.aux_classifier = None  # the pretrained builders force it on; inference skips it
    return TorchvisionSegmenterAdapter(
        module,
        name=name,
        weights_id=spec.weights_id,
        random_weights=spec.kind == "none",
        categories=categories,
        probabilities=probabilities,
    )


def build_deeplabv3(
    weights: str = "DEFAULT", *, probabilities: bool = False
) -> TorchvisionSegmenterAdapter:
    """Torchvision DeepLabV3 ResNet-50, VOC classes (:func:`build_torchvision_segmenter`)."""
    return build_torchvision_segmenter("deeplabv3", weights, probabilities=probabilities)


def build_fcn(
    weights: str = "DEFAULT", *, probabilities: bool = False
) -> TorchvisionSegmenterAdapter:
    """Torchvision FCN ResNet-50, VOC classes (:func:`build_torchvision_segmenter`)."""
    return build_torchvision_segmenter("fcn", weights, probabilities=probabilities)


def build_lraspp(
    weights: str = "DEFAULT", *, probabilities: bool = False
) -> TorchvisionSegmenterAdapter:
    """Torchvision LR-ASPP MobileNetV3-Large, VOC classes (:func:`build_torchvision_segmenter`)."""
    return build_torchvision_segmenter("lraspp", weights, probabilities=probabilities)


class ReferenceSegmenterAdapter(ModelAdapter):
    """Bright-pixel segmenter (rule based, not trained); see the module docstring.

    ``in_bands = 0``: any band count works (every band must be bright). The mask is computed
    with autocast off, as the reference detector's, so the class map is exact whatever the
    run's precision. Probabilities are one-hot: 255 for the pixel's class, 0 for the other.
    """

    def __init__(self, *, threshold: float = BRIGHT_THRESHOLD, probabilities: bool = False) -> None:
        super().__init__(
            name="reference-seg",
            task="segmentation",
            categories=REFERENCE_SEG_CATEGORIES,
            in_bands=0,
            random_weights=False,
            weights_id="none",
            module=BrightMask(threshold),  # type: ignore[arg-type]
        )
        self.probabilities = probabilities

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pass the (B, C, H, W) tiles through unchanged (the mask is the forward pass)."""
        return images

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The (B, H, W) bool bright mask, with autocast off."""
        with fp32(inputs.device.type):
            return self._network(inputs)  # type: ignore[no-any-return]

    def class_scores(self, raw: Any) -> torch.Tensor:
        """The bright mask as 2-class log-probabilities (0 and -inf), for ``tta=``."""
        mask = raw.to(torch.float32)
        return torch.stack([1.0 - mask, mask], dim=1).log()

    def postprocess(self, raw: Any, tile_size: int) -> list[ClassMap]:  # type: ignore[override]
        """(B, H, W) bool mask -> uint8 class ids (1 bright, 0 background) per tile.

        ``tta=`` hands (B, 2, H, W) averaged log-probabilities instead (the views' vote).
        """
        if raw.is_floating_point():
            return class_maps_from_logits(raw, self.probabilities)
        ids = raw.to(torch.uint8).cpu().numpy()
        out: list[ClassMap] = []
        for tile_ids in ids:
            probs = None
            if self.probabilities:
                probs = np.stack([(1 - tile_ids) * 255, tile_ids * 255]).astype(np.uint8)
            out.append(ClassMap(class_ids=tile_ids, probabilities=probs))
        return out


def build_reference_seg(
    weights: str = "none", *, probabilities: bool = False
) -> ReferenceSegmenterAdapter:
    """Build the reference segmenter; it has no weights (``weights`` must be none or DEFAULT).

    Args:
        weights: ``none`` or ``DEFAULT`` (both mean: no weights).
        probabilities: also return one-hot uint8 probabilities per tile.
    """
    require_no_weights("reference-seg", weights)
    return ReferenceSegmenterAdapter(probabilities=probabilities)
