"""Faster R-CNN and Mask R-CNN, and the float32 box path of every torchvision detector.

The built-in detectors are torchvision's ``fasterrcnn_resnet50_fpn`` and the instance
segmenter ``maskrcnn_resnet50_fpn`` (COCO classes; boxes and each object's mask); the box path
(:func:`exact_detector_forward`) also serves two-stage R-CNNs, RetinaNet, FCOS and SSD brought
as ``model=my_pkg.my_module:build``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias, cast

import torch
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD

from mgpr.models.amp import autocast_state, fp32
from mgpr.models.base import Detections, ModelAdapter, detections_from_dicts
from mgpr.models.weights import build_torchvision_model

#: Key of the Faster R-CNN class head; its first dimension is the class count (background incl.).
_CLS_HEAD = "roi_heads.box_predictor.cls_score.weight"

#: Boxes kept per tile by default (torchvision's ``box_detections_per_img``).
MAX_DETECTIONS = 100


#: torchvision's single-stage detectors: backbone -> dense head -> anchors -> decoding + NMS.
SingleStageDetector: TypeAlias = RetinaNet | FCOS | SSD


def backbone_features(
    model: GeneralizedRCNN | SingleStageDetector,
    images: list[torch.Tensor],
    backbone: Callable[[torch.Tensor], Any] | None = None,
) -> tuple[ImageList, OrderedDict[str, torch.Tensor], list[tuple[int, int]]]:
    """The front every torchvision detector shares, as its own forward runs it.

    Its transform (normalise, resize) in float32, then the backbone (+ FPN) under the caller's
    autocast.

    Args:
        model: a torchvision detector with ``transform`` and ``backbone``.
        images: C x H x W float tensors in [0, 1], all on the model's device.
        backbone: what to call instead of ``model.backbone`` (a compiled version of it).

    Returns:
        The transformed batch, its feature maps by name in the backbone's output dtype (bf16
        under bf16 autocast), and each input image's (H, W) for the map back to its pixels.
    """
    device_type = images[0].device.type if images else "cpu"
    enabled, dtype = autocast_state(device_type)
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    with fp32(device_type):
        batch, _ = model.transform([img.float() for img in images])
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        features = (backbone or model.backbone)(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    return batch, features, sizes


def exact_box_forward(
    model: GeneralizedRCNN,
    images: list[torch.Tensor],
    backbone: Callable[[torch.Tensor], Any] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``model(images)`` in eval mode, with every box coordinate computed in float32.

    torchvision builds anchors, proposals and decoded boxes in the dtype of the feature maps, so
    under bf16 autocast every box edge between 512 and 1024 px is a multiple of 4 px (2 px
    between 256 and 512, 8 px above 1024) and scores are rounded too. Here only the backbone
    (+ FPN, ~all of the compute) runs under the caller's autocast; its feature maps are cast to
    float32 and the RPN (anchors, objectness, decoding, NMS), the ROI heads (RoIAlign, box
    head, class scores, box regression, per-class NMS) and the map back to input pixels run with
    autocast off. Without autocast this is exactly ``model(images)``.

    Args:
        model: a torchvision ``GeneralizedRCNN`` (Faster R-CNN, ...) in eval mode.
        images: C x H x W float tensors in [0, 1], all on the model's device.
        backbone: what to call instead of ``model.backbone`` (a compiled version of it).

    Returns:
        One dict per image: ``boxes`` (N, 4) float32 xyxy in the input image's pixels,
        ``scores`` (N,) float32, ``labels`` (N,) int64.
    """
    device_type = images[0].device.type if images else "cpu"
    batch, features, sizes = backbone_features(model, images, backbone)
    features = OrderedDict((name, f.float()) for name, f in features.items())
    with fp32(device_type):
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        out = model.transform.postprocess(detections, batch.image_sizes, sizes)
        return cast(list[dict[str, torch.Tensor]], out)


def head_output_layers(head: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The layers that make a dense head's outputs: class logits, box deltas, centre-ness.

    Known for torchvision's ``RetinaNetHead`` and ``FCOSHead`` (their ``cls_logits``,
    ``bbox_reg`` and ``bbox_ctrness`` convolutions); None for any other head (SSD's heads are
    nothing but such layers), which then runs in float32 as a whole.
    """
    if not isinstance(head, (RetinaNetHead, FCOSHead)):
        return None
    names = ("cls_logits", "bbox_reg", "bbox_ctrness")
    parts = (head.classification_head, head.regression_head)
    return [getattr(part, n) for part in parts for n in names if hasattr(part, n)]


@contextmanager
def outputs_in_fp32(layers: list[torch.nn.Module], device_type: str) -> Iterator[None]:
    """Within the block, each of ``layers`` runs with autocast off on float32 input.

    Done by an instance ``forward`` that wraps the class's for the block only: the module tree
    and its ``state_dict`` stay as they are.
    """

    def in_fp32(layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            with fp32(device_type):
                return cast(torch.Tensor, type(layer).forward(layer, x.float()))

        return forward

    patched = [layer for layer in layers if "forward" not in layer.__dict__]
    for layer in patched:
        layer.forward = in_fp32(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def exact_single_stage_forward(
    model: SingleStageDetector,
    images: list[torch.Tensor],
    backbone: Callable[[torch.Tensor], Any] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``model(images)`` in eval mode for RetinaNet, FCOS or SSD, with float32 boxes and scores.

    Their own forward makes anchors (``anchor_generator``) in the feature maps' dtype and decodes
    in the head outputs' dtype, so under bf16 autocast boxes sit on the same 4 px step as
    Faster R-CNN's, and class logits near -4.6 (RetinaNet's prior) on a 0.03 step, which turns
    near-equal scores into ties that the top-k and NMS then break at random. Here the backbone
    (+ FPN) and the head's convolution towers run under the caller's autocast; the layers that
    make the head's outputs (class logits, box deltas, FCOS's centre-ness:
    :func:`head_output_layers`), the anchors, the decoding, NMS and the map back to input
    pixels run in float32 (a head of another kind runs in float32 whole). What that costs is
    measured by ``benchmarks/single_stage_bf16.py`` (README, Precision). Without autocast this
    is exactly ``model(images)``.

    Args:
        model: a torchvision ``RetinaNet``, ``FCOS`` or ``SSD`` in eval mode.
        images: C x H x W float tensors in [0, 1], all on the model's device.
        backbone: what to call instead of ``model.backbone`` (a compiled version of it).

    Returns:
        One dict per image: ``boxes`` (N, 4) float32 xyxy in the input image's pixels,
        ``scores`` (N,) float32, ``labels`` (N,) int64.
    """
    device_type = images[0].device.type if images else "cpu"
    enabled, dtype = autocast_state(device_type)
    batch, features, sizes = backbone_features(model, images, backbone)
    levels = list(features.values())
    outputs = head_output_layers(model.head)
    if outputs is None:
        with fp32(device_type):
            head_outputs = model.head([f.float() for f in levels])
    else:
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            with outputs_in_fp32(outputs, device_type):
                head_outputs = model.head(levels)
    head_outputs = {k: v.float() for k, v in head_outputs.items()}
    # The anchor generators read only the maps' shapes and dtype: float32 views of no memory.
    shapes = [torch.empty((), device=f.device).expand(f.shape) for f in levels]
    with fp32(device_type):
        anchors = model.anchor_generator(batch, shapes)
        if isinstance(model, SSD):
            detections = model.postprocess_detections(head_outputs, anchors, batch.image_sizes)
        else:
            # Outputs are (B, sum over levels of H*W*A, ...): split per level as torchvision's
            # forward does (A anchors per position; 1 for FCOS).
            per_level = [int(f.shape[-2] * f.shape[-1]) for f in levels]
            per_position = int(head_outputs["cls_logits"].shape[1]) // sum(per_level)
            counts = [n * per_position for n in per_level]
            split = {k: list(v.split(counts, dim=1)) for k, v in head_outputs.items()}
            split_anchors = [list(a.split(counts)) for a in anchors]
            detections = model.postprocess_detections(split, split_anchors, batch.image_sizes)
        out = model.transform.postprocess(detections, batch.image_sizes, sizes)
        return cast(list[dict[str, torch.Tensor]], out)


#: torchvision's detector classes whose eval forward :func:`exact_detector_forward` re-states.
_BOX_PATHS: tuple[type[torch.nn.Module], ...] = (GeneralizedRCNN, RetinaNet, FCOS, SSD)


def is_torchvision_detector(module: torch.nn.Module) -> bool:
    """Whether :func:`exact_detector_forward` knows ``module``'s box path.

    True for torchvision's R-CNNs (``GeneralizedRCNN``: Faster, Mask, Keypoint R-CNN), RetinaNet,
    FCOS, SSD and their subclasses, unless a subclass overrides ``forward``: then its own
    forward is what the user means, and it runs as is.
    """
    base = next((cls for cls in _BOX_PATHS if isinstance(module, cls)), None)
    return base is not None and type(module).forward is base.forward


def exact_detector_forward(
    module: torch.nn.Module,
    images: list[torch.Tensor],
    backbone: Callable[[torch.Tensor], Any] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The float32-box forward of a torchvision detector (:func:`is_torchvision_detector`).

    :func:`exact_box_forward` for two-stage R-CNNs, :func:`exact_single_stage_forward` else.
    """
    if not is_torchvision_detector(module):
        raise TypeError(f"{type(module).__name__} is no torchvision detector with its own forward")
    if isinstance(module, GeneralizedRCNN):
        return exact_box_forward(module, images, backbone)
    assert isinstance(module, (RetinaNet, FCOS, SSD))
    return exact_single_stage_forward(module, images, backbone)


class TorchvisionDetectorAdapter(ModelAdapter):
    """A torchvision ``GeneralizedRCNN`` detector: list of (C, H, W) float [0, 1] -> list of dicts.

    The model normalises (ImageNet mean/std) and resizes inside its own
    ``GeneralizedRCNNTransform``, on whatever device it runs on, so ``prepare`` only splits the
    scaled [0, 1] batch into tiles. Boxes come back in the input tile's pixel coordinates whatever
    the internal resize was, computed in float32 whatever the precision of the backbone
    (:func:`exact_box_forward`).
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
        self._backbone: Callable[[torch.Tensor], Any] | None = None

    def forward(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detect with float32 box coordinates; the backbone under the caller's autocast."""
        assert isinstance(self.module, GeneralizedRCNN)
        return exact_box_forward(self.module, inputs, self._backbone)

    def compile(self, compiler: Callable[[torch.nn.Module], Callable[..., Any]]) -> None:
        """Compile the backbone + FPN only: fixed (B, 3, H, W) in, feature maps out.

        The RPN and ROI heads have data-dependent shapes (proposals kept, boxes after NMS) and
        run in float32; compiling them would recompile for every new count.
        """
        assert isinstance(self.module, GeneralizedRCNN)
        self._backbone = compiler(self.module.backbone)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The detector's own transform normalises with the given statistics, not ImageNet's."""
        self._check_band_count(mean)
        assert isinstance(self.module, GeneralizedRCNN)
        self.module.transform.image_mean = [float(v) for v in mean]
        self.module.transform.image_std = [float(v) for v in std]

    def prepare(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Split the scaled batch into the list torchvision's detectors take.

        Args:
            images: (B, 3, H, W) float32 in [0, 1] on the device.

        Returns:
            B tensors (3, H, W) float32 in [0, 1] (views of one batched tensor).
        """
        return list(images.unbind(0))

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
    max_detections: int = MAX_DETECTIONS,
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
        max_detections: boxes kept per tile at most, best scores first (torchvision's
            ``box_detections_per_img``; raise it for tiles with many small objects).

    Categories: the COCO names of the weights' meta (91 entries with ``__background__`` and
    ``N/A`` gaps, indexed by label id); with ``none`` or a 91-class checkpoint the ``DEFAULT``
    names, otherwise None.

    Raises:
        ModelError: bad weights name, missing/unfit checkpoint, or weights not downloadable.
    """
    return _build_rcnn(
        "fasterrcnn",
        fasterrcnn_resnet50_fpn,
        FasterRCNN_ResNet50_FPN_Weights,
        weights,
        score_threshold=score_threshold,
        native_resolution=native_resolution,
        tile_size=tile_size,
        max_detections=max_detections,
    )


def build_maskrcnn(
    weights: str = "DEFAULT",
    *,
    score_threshold: float = 0.05,
    native_resolution: bool = True,
    tile_size: int = 512,
    max_detections: int = MAX_DETECTIONS,
) -> TorchvisionDetectorAdapter:
    """Build the torchvision Mask R-CNN ResNet-50 FPN instance segmenter adapter.

    Faster R-CNN plus a mask head: each box comes with the object's pixels (its mask pasted
    onto the tile, probability > 0.5), which the run traces into the object's outline
    (:func:`mgpr.tasks.detection.mask_outline`). Arguments as :func:`build_fasterrcnn`
    (``DEFAULT`` = ``COCO_V1``; a checkpoint's class count is read from its box predictor, and
    its mask predictor must have as many).
    """
    return _build_rcnn(
        "maskrcnn",
        maskrcnn_resnet50_fpn,
        MaskRCNN_ResNet50_FPN_Weights,
        weights,
        score_threshold=score_threshold,
        native_resolution=native_resolution,
        tile_size=tile_size,
        max_detections=max_detections,
    )


def _build_rcnn(
    name: str,
    builder: Any,
    weights_enum: Any,
    weights: str,
    *,
    score_threshold: float,
    native_resolution: bool,
    tile_size: int,
    max_detections: int,
) -> TorchvisionDetectorAdapter:
    """A torchvision R-CNN of ``builder`` at tile resolution, its box thresholds set."""
    kwargs: dict[str, Any] = {
        "weights_backbone": None,
        "box_score_thresh": score_threshold,
        "box_detections_per_img": max_detections,
    }
    if native_resolution:
        kwargs.update(min_size=tile_size, max_size=tile_size)
    spec, module, categories = build_torchvision_model(
        name,
        weights,
        builder,
        _CLS_HEAD,
        tuple(weights_enum.DEFAULT.meta["categories"]),
        "detections",
        **kwargs,
    )
    return TorchvisionDetectorAdapter(
        module,
        name=name,
        weights_id=spec.weights_id,
        random_weights=spec.kind == "none",
        categories=categories,
        score_threshold=score_threshold,
    )
