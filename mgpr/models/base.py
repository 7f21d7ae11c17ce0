"""The model adapter interface and the per-tile result records.

A :class:`ModelAdapter` splits inference into three steps so the pipeline can place each one:

1. :meth:`ModelAdapter.prepare`: ``(B, C, H, W)`` float32 tiles in [0, 1], already ON THE DEVICE
   (the pipeline scaled the raster's values there with ``value_range``,
   :mod:`mgpr.data.scaling`) -> model input (the model's own normalisation only).
2. :meth:`ModelAdapter.forward`: the network itself (run under ``inference_mode``/autocast by the
   caller).
3. :meth:`ModelAdapter.postprocess`: raw output -> one plain record per tile on the CPU, in TILE
   pixel coordinates (the georeferencing happens later, in ``mgpr.geo.georef``).

This module imports no Lightning: the pipeline's LightningModule wraps an adapter and registers
:attr:`ModelAdapter.module` as a submodule so Lightning moves it to the device.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from mgpr.errors import ConfigError, ModelError

#: What a model produces per tile.
Task = Literal["classification", "detection", "segmentation", "embedding"]
TASKS: tuple[str, ...] = get_args(Task)
#: What :meth:`ModelAdapter.prepare` receives: ``unit`` = float32 in [0, 1] (``value_range``
#: applied), ``raw`` = float32 native raster values, unscaled.
InputRange = Literal["unit", "raw"]
INPUT_RANGES: tuple[str, ...] = get_args(InputRange)
#: What a user module's class scores are (its ``output_kind`` attribute): ``logits`` (default;
#: softmax, or sigmoid for one channel) or ``probabilities`` (already softmax / sigmoid: used as
#: they are, one channel thresholded at 0.5). A module exported with ``activation="sigmoid"``
#: read as logits put every pixel in class 1.
OutputKind = Literal["logits", "probabilities"]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)


@dataclass(frozen=True, slots=True)
class InstanceMask:
    """The pixels of one detected object (an instance segmenter's mask), cropped to them.

    The crop is the bounding window of the object's pixels (a Mask R-CNN mask may reach a
    little past its box), so an object costs its own window of host memory, not the tile's.

    Attributes:
        row, col: the crop's top-left pixel in TILE pixel coordinates.
        mask: (h, w) bool, True on the object's pixels (the model's mask probability > 0.5).
    """

    row: int
    col: int
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError(f"InstanceMask needs an (h, w) bool mask; got {self.mask.shape}")


@dataclass(frozen=True, slots=True)
class Detections:
    """Objects found in one tile.

    Attributes:
        boxes: (N, 4) float32 ``xyxy`` = ``(col_min, row_min, col_max, row_max)`` in TILE pixel
            CORNER coordinates (x = column, y = row, origin at the tile's top-left corner), in
            ``0..tile_size``; half-open, so a box covering pixel column 0 only is ``0..1``.
        scores: (N,) float32 confidence in [0, 1].
        labels: (N,) int64 class ids, indices into :attr:`ModelAdapter.categories`.
        masks: an instance segmenter's (Mask R-CNN) object pixels, one :class:`InstanceMask`
            per box in the same order; None for a box detector.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: tuple[InstanceMask, ...] | None = None

    def __post_init__(self) -> None:
        n = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if (
            self.boxes.ndim != 2
            or self.boxes.shape != (n, 4)
            or self.labels.shape != (n,)
            or self.boxes.dtype != np.float32
            or self.scores.dtype != np.float32
            or self.labels.dtype != np.int64
        ):
            raise ValueError(
                "Detections needs boxes (N, 4) float32, scores (N,) float32, labels (N,) int64; "
                f"got {self.boxes.shape} {self.boxes.dtype}, {self.scores.shape} "
                f"{self.scores.dtype}, {self.labels.shape} {self.labels.dtype}"
            )
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"Detections needs one mask per box; got {len(self.masks)} for {n}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def nbytes(self) -> int:
        """Host bytes of the masks' crops (the part writer bounds a chunk by them); boxes: 0."""
        return sum(int(m.mask.nbytes) for m in self.masks) if self.masks else 0

    def take(self, keep: np.ndarray) -> Detections:
        """The detections at ``keep`` (indices, or a bool mask), in that order, masks too."""
        index = np.flatnonzero(keep) if np.asarray(keep).dtype == np.bool_ else np.asarray(keep)
        masks = None if self.masks is None else tuple(self.masks[int(i)] for i in index)
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            masks=masks,
        )

    def best(self, n: int) -> Detections:
        """The ``n`` highest-scoring detections, highest first.

        Equal scores keep the order they came in; ``self`` when it holds no more than ``n``.
        """
        if len(self) <= n:
            return self
        return self.take(np.argsort(-self.scores, kind="stable")[:n])

    @classmethod
    def empty(cls) -> Detections:
        """Return a tile result with no objects (same type and dtypes as a full one)."""
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            labels=np.zeros((0,), np.int64),
        )


@dataclass(frozen=True, slots=True)
class Classification:
    """The top-k classes of one tile.

    Attributes:
        class_ids: (k,) int64 class ids, best first; indices into :attr:`ModelAdapter.categories`.
        scores: (k,) float32 softmax probabilities (or, for the ``null`` model, the mean
            brightness in [0, 1]), in the same order.
    """

    class_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if (
            self.class_ids.ndim != 1
            or self.class_ids.shape != self.scores.shape
            or self.class_ids.dtype != np.int64
            or self.scores.dtype != np.float32
        ):
            raise ValueError(
                "Classification needs class_ids (k,) int64 and scores (k,) float32; got "
                f"{self.class_ids.shape} {self.class_ids.dtype}, "
                f"{self.scores.shape} {self.scores.dtype}"
            )


@dataclass(frozen=True, slots=True)
class Embedding:
    """The feature vector of one tile (``task = "embedding"``): what the network sees in it.

    Attributes:
        vector: (D,) float32, the network's pooled features for the tile (D fixed per model);
            not normalised (cosine similarity users divide by the norm themselves).
    """

    vector: np.ndarray

    def __post_init__(self) -> None:
        if self.vector.ndim != 1 or self.vector.dtype != np.float32 or not self.vector.size:
            raise ValueError(
                f"Embedding needs a (D,) float32 vector; got {self.vector.shape} "
                f"{self.vector.dtype}"
            )


@dataclass(frozen=True, slots=True)
class ClassMap:
    """The class of every pixel of one tile (segmentation), on the tile's own pixel grid.

    Attributes:
        class_ids: (H, W) class id per TILE pixel (row 0 = the tile's top row), indices into
            :attr:`ModelAdapter.categories`; uint8 for models with at most 256 classes, else
            uint16 (the raster writer chooses the output dtype and nodata value).
        probabilities: (K, H, W) uint8 ``round(p * 255)`` of every class's softmax probability
            ``p``, when the adapter was asked for them (``probabilities`` / blended seams), else
            None. uint8 because that is what the probability raster stores: 4x less host
            memory and transfer than float32, and the same bytes on every run.
        valid: (H, W) validity of the tile's pixels (the data pipeline's nodata mask, nonzero =
            valid; set by :func:`mgpr.tasks.nodata.drop_masked`), or None when every pixel is
            valid. The class map writes nodata where it is 0.
    """

    class_ids: np.ndarray
    probabilities: np.ndarray | None = None
    valid: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Host bytes this tile's arrays hold (the part writer bounds a chunk by them)."""
        arrays = (self.class_ids, self.probabilities, self.valid)
        return sum(int(a.nbytes) for a in arrays if a is not None)

    def __post_init__(self) -> None:
        ids, probs = self.class_ids, self.probabilities
        if ids.ndim != 2 or ids.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"ClassMap needs class_ids (H, W) uint8 or uint16; got {ids.shape} {ids.dtype}"
            )
        if probs is not None and (
            probs.ndim != 3 or probs.shape[1:] != ids.shape or probs.dtype != np.uint8
        ):
            raise ValueError(
                f"ClassMap needs probabilities (K, {ids.shape[0]}, {ids.shape[1]}) uint8; got "
                f"{probs.shape} {probs.dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the tile, pixels."""
        return (int(self.class_ids.shape[0]), int(self.class_ids.shape[1]))


class ModelAdapter(abc.ABC):
    """A network plus the glue that feeds it scaled tiles and turns its output into records.

    Attributes:
        name: ``"resnet50"``, ``"fasterrcnn"``, ``"reference"``, ``"null"``, or the import path
            of a user model.
        task: ``"classification"`` (one :class:`Classification` per tile), ``"detection"``
            (one :class:`Detections` per tile), ``"segmentation"`` (one :class:`ClassMap`) or
            ``"embedding"`` (one :class:`Embedding`).
        categories: label names by class id (ImageNet / COCO names from the torchvision weights'
            meta where known), or None when unknown.
        in_bands: number of raster bands the model needs (3 for the torchvision models); 0 means
            any band count works.
        random_weights: True when the network runs with random weights (``weights=none``), so
            its predictions are meaningless; the pipeline says so plainly.
        weights_id: what was loaded: ``"none"``, a torchvision enum name such as
            ``"ResNet50_Weights.IMAGENET1K_V2"``, ``"file:<abs path>#sha256:<first 16 hex>"``,
            or for a user model the weights string it was given.
        module: the network, in eval mode with gradients off; the caller moves it to the device.
        input_range: ``"unit"`` (default): :meth:`prepare` gets float32 in [0, 1]; ``"raw"``: it
            gets float32 native values (uint16 counts, reflectance, ...), no ``value_range``.
    """

    input_range: InputRange = "unit"
    #: Why ``tta=`` has nothing to average for this adapter (refused before any tile), or None.
    tta_refusal: str | None = None

    name: str
    task: Task
    categories: tuple[str, ...] | None
    in_bands: int
    random_weights: bool
    weights_id: str
    module: torch.nn.Module

    def __init__(
        self,
        *,
        name: str,
        task: Task,
        categories: Sequence[str] | None,
        in_bands: int,
        random_weights: bool,
        weights_id: str,
        module: torch.nn.Module,
    ) -> None:
        if task not in TASKS:
            raise ModelError(
                f"model={name} declares task={task!r}, which is not one of {TASKS}; "
                f"set the adapter's task to one of {', '.join(TASKS)}."
            )
        if task == "segmentation" and not categories:
            # The class count decides the class map's dtype (uint8 / uint16), its nodata value
            # and the probability bands: guessing it would wrap ids or drop classes silently.
            raise ModelError(
                f"model={name} is a segmentation model without categories; set its categories "
                "to one name per class id (e.g. categories = ['background', 'building'])."
            )
        self.name = name
        self.task = task
        self.categories = tuple(categories) if categories is not None else None
        self.in_bands = int(in_bands)
        self.random_weights = bool(random_weights)
        self.weights_id = weights_id
        self.module = frozen(module)
        # What forward calls: the module, or what compile() made of it.
        self._network: Callable[..., Any] = self.module

    @abc.abstractmethod
    def prepare(self, images: torch.Tensor) -> Any:
        """Turn a batch of scaled tiles into the network's input, on the device.

        The contract: the pipeline has already mapped the raster's values to [0, 1] on the
        device (``value_range``; uint8 rasters by default ``x / 255``, the same floats as before
        this contract), so ``prepare`` applies only the model's own normalisation (ImageNet
        mean/std, ...) and layout. It may modify ``images`` in place (it is a fresh tensor).

        Args:
            images: (B, C, H, W) float32 in [0, 1] (``input_range = "raw"``: native values),
                already on the device the module lives on.

        Returns:
            The network's input (float32 for the torchvision models; autocast casts it further).
        """

    def forward(self, inputs: Any) -> Any:
        """Run the network on the output of :meth:`prepare`; returns its raw output."""
        return self._network(inputs)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise with ``(x - mean) / std`` per band instead of the model's own (the keys).

        A network fine-tuned on its dataset's statistics needs them, not ImageNet's. Adapters
        with a normalisation step override this; the default has none to replace.

        Raises:
            ConfigError: this model reads the scaled input as it is.
        """
        raise ConfigError(
            f"mean/std: model={self.name} reads the scaled [0, 1] input as it is and has no "
            "normalisation to replace; leave mean and std out"
        )

    def _check_band_count(self, mean: Sequence[float]) -> None:
        """One mean/std value per band the model takes, or a one-line refusal."""
        if self.in_bands and len(mean) != self.in_bands:
            raise ConfigError(
                f"mean/std give {len(mean)} value(s) but model={self.name} takes "
                f"{self.in_bands} band(s); give one value per band"
            )

    def compile(self, compiler: Callable[[torch.nn.Module], Callable[..., Any]]) -> None:
        """Let :meth:`forward` call ``compiler(part)`` for the compute-heavy part of the network.

        The default compiles the whole module (classifiers: fixed-shape tensor in, tensor out).
        Detectors override it to compile only the backbone: their proposal and box stages have
        data-dependent shapes and run in float32 anyway (:mod:`mgpr.models.amp`). The parameters
        stay those of :attr:`module` (a compiled callable shares them; nothing is copied).

        Args:
            compiler: e.g. ``lambda m: torch.compile(m, dynamic=False)``; called once, here.
        """
        self._network = compiler(self.module)

    def class_scores(self, raw: Any) -> torch.Tensor:
        """:meth:`forward`'s output as class logits, for test-time augmentation (``tta=``).

        (B, K) for a classifier, (B, K, H, W) for a segmenter, any float dtype (K = 1: a binary
        model's sigmoid logit). The default takes a float tensor of those shapes as it is (the
        torchvision adapters' outputs); adapters whose output is something else convert it, or
        refuse with the reason (:class:`~mgpr.errors.ModelError`).
        """
        if (
            self.task != "detection"
            and isinstance(raw, torch.Tensor)
            and raw.is_floating_point()
            and raw.ndim == (4 if self.task == "segmentation" else 2)
        ):
            return raw
        what = (
            f"a {tuple(raw.shape)} {raw.dtype} tensor"
            if isinstance(raw, torch.Tensor)
            else (type(raw).__name__)
        )
        raise ModelError(
            f"tta= averages class probabilities, but model={self.name} returns {what}, not "
            f"class logits; unset tta"
        )

    def with_class_scores(self, scores: torch.Tensor) -> Any:
        """What :meth:`forward` would return, made of averaged class log-probabilities.

        :meth:`postprocess` reads them as logits (softmax of log-probabilities is the
        probabilities). The default is the tensor itself.
        """
        return scores

    @abc.abstractmethod
    def postprocess(
        self, raw: Any, tile_size: int
    ) -> list[Detections] | list[Classification] | list[ClassMap] | list[Embedding]:
        """Turn the raw output of :meth:`forward` into one CPU record per tile.

        Args:
            raw: what :meth:`forward` returned for a batch of B tiles.
            tile_size: tile edge in pixels (boxes lie in ``0..tile_size``).

        Returns:
            B records, in batch order: :class:`Detections` for detection, :class:`Classification`
            for classification, :class:`ClassMap` for segmentation, :class:`Embedding` for
            embedding; numpy arrays on the CPU.
        """

    def predict(
        self, images: torch.Tensor, tile_size: int
    ) -> list[Detections] | list[Classification] | list[ClassMap] | list[Embedding]:
        """Run prepare, forward and postprocess in one call (tests, notebooks; no autocast).

        Args:
            images: (B, C, H, W) on the module's device: uint8 (scaled by the uint8 default
                [0, 255] first, as a run does) or float32 already in the adapter's input range.
            tile_size: tile edge in pixels.
        """
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255.0)
        return self.postprocess(self.forward(self.prepare(images)), tile_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, task={self.task!r}, "
            f"categories={'None' if self.categories is None else len(self.categories)}, "
            f"in_bands={self.in_bands}, random_weights={self.random_weights}, "
            f"input_range={self.input_range!r}, "
            f"weights_id={self.weights_id!r})"
        )


class ChannelNormaliser:
    """``(x - mean) / std`` per band, in place, the constants moved to each device once.

    The ImageNet statistics of the torchvision adapters and the ``mean``/``std`` keys
    (:meth:`ModelAdapter.set_normalisation`) share it: two in-place ops per batch, no host copy.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self._mean = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
        self._std = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) float32 normalised in place on its device; returned."""
        pair = self._on.get(x.device)
        if pair is None:  # once per device, not per batch
            pair = self._on[x.device] = (self._mean.to(x.device), self._std.to(x.device))
        return x.sub_(pair[0]).div_(pair[1])


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with every parameter's gradient off, returned for chaining.

    Per parameter rather than ``module.requires_grad_(False)``: a TorchScript module
    (``torch.jit.load(path)``, a common way to ship a model) refuses that method ("not
    supported on ScriptModules") but not its parameters' own flag. Inference runs under
    ``inference_mode`` anyway; the flags keep a notebook's ``adapter.predict`` from building a
    graph.
    """
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def nonfinite_tiles(raw: Any, n: int) -> torch.Tensor | None:
    """Per tile (the first ``n``): True where the model's raw output holds NaN (or bad boxes).

    Broken means any NaN, or a box corner that is not finite. ``-inf`` logits are left alone
    (a model may mask classes that way; softmax copes). Reads the forms mgpr knows (a tensor
    with the batch first, a dict with ``out``, a list of detection dicts); anything else (a
    user adapter's own output type) gives None: unchecked. Returns a bool tensor on the
    output's device: the caller reads it back after the postprocess has queued its own work,
    so the check costs one reduction and no extra wait. Half-precision overflow shows up here:
    without the check a NaN logit became class 0 of a class map and a NaN score a dropped box.
    """
    if isinstance(raw, dict) and isinstance(raw.get("out"), torch.Tensor):
        raw = raw["out"]
    if isinstance(raw, torch.Tensor):
        if not raw.is_floating_point() or raw.ndim == 0:
            return None
        rows = raw[:n]
        return torch.isnan(rows.reshape(rows.shape[0], -1)).any(dim=1)
    if isinstance(raw, (list, tuple)) and raw and all(isinstance(d, dict) for d in raw):
        flags = []
        for det in raw[:n]:
            boxes, scores = det.get("boxes"), det.get("scores")
            if not isinstance(boxes, torch.Tensor) or not isinstance(scores, torch.Tensor):
                return None
            flags.append(~torch.isfinite(boxes.float()).all() | torch.isnan(scores.float()).any())
        return torch.stack(flags)
    return None


def class_probabilities_of(scores: torch.Tensor, kind: OutputKind = "logits") -> torch.Tensor:
    """(B, K[, H, W]) class scores -> float32 probabilities over dim 1 (K = 1: ``[1 - p, p]``).

    ``kind="probabilities"``: the scores already are (a module ending in softmax or sigmoid),
    taken as they are, clamped to [0, 1] (a second softmax flattened 1.0 to 0.475).
    """
    s = scores.float()
    if kind == "probabilities":
        p = s.clamp(0.0, 1.0)
        return torch.cat([1.0 - p, p], dim=1) if s.shape[1] == 1 else p
    if s.shape[1] == 1:
        p = torch.sigmoid(s)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(s, dim=1)


def classifications_from_logits(
    logits: torch.Tensor, topk: int, kind: OutputKind = "logits"
) -> list[Classification]:
    """Softmax then top-k, per row, moved to the CPU.

    One column (K = 1) is a binary classifier's logit (sigmoid): classes 0 and 1 with
    probabilities ``1 - p`` and ``p`` (a softmax over one column would be 1.0 for class 0 on
    every tile).

    Args:
        logits: (B, K) raw class scores, any float dtype, any device.
        topk: classes to keep per tile; clipped to K (to 2 for one logit).
        kind: ``probabilities``: the scores are already probabilities (no softmax / sigmoid).

    Returns:
        B :class:`Classification` records, best class first.
    """
    probs = class_probabilities_of(logits, kind)
    k = min(topk, probs.shape[1])
    scores, ids = probs.topk(k, dim=1, largest=True, sorted=True)
    scores_np = scores.cpu().numpy().astype(np.float32, copy=False)
    ids_np = ids.cpu().numpy().astype(np.int64, copy=False)
    return [Classification(class_ids=ids_np[i], scores=scores_np[i]) for i in range(len(ids_np))]


def pooled_features(raw: Any, name: str) -> torch.Tensor:
    """An embedding model's output as (B, D) float32 features, on its device.

    (B, D) is taken as it is (a tensor, or a float numpy array); a (B, D, h, w) feature map
    (a CNN backbone's last stage) is averaged over its h x w cells (global average pooling,
    what torchvision's classifiers do before their head). Token sequences (B, N, D) are
    refused: which token (a class token, or the mean) stands for the tile is the model's
    choice, not mgpr's.

    Raises:
        ModelError: any other output, with the shape to return.
    """
    if isinstance(raw, np.ndarray) and raw.dtype.kind == "f":
        raw = torch.from_numpy(np.ascontiguousarray(raw))  # a module returning numpy
    if isinstance(raw, torch.Tensor) and raw.is_floating_point():
        if raw.ndim == 2 and raw.shape[1] > 0:
            return raw.float()
        if raw.ndim == 4 and raw.shape[1] > 0:
            return raw.float().mean(dim=(2, 3))
    what = (
        f"a {tuple(raw.shape)} {raw.dtype} tensor"
        if isinstance(raw, torch.Tensor)
        else f"a {type(raw).__name__}"
    )
    hint = (
        " (tokens: return x[:, 0] for a class token or x.mean(dim=1))"
        if isinstance(raw, torch.Tensor) and raw.ndim == 3
        else ""
    )
    raise ModelError(
        f"model={name} is an embedding model but returns {what}; return (B, D) float features "
        f"per tile, or a (B, D, h, w) feature map to be averaged{hint}."
    )


def embeddings_from_features(raw: Any, name: str) -> list[Embedding]:
    """One :class:`Embedding` per tile from (B, D) or (B, D, h, w) features (float32 on the CPU).

    Mixed precision computes the features in bf16/fp16; they are stored as float32 (the cast
    is exact).
    """
    host = pooled_features(raw, name).cpu().numpy()
    return [Embedding(vector=host[i]) for i in range(host.shape[0])]


def detections_from_dicts(
    raw: Sequence[dict[str, torch.Tensor]], score_threshold: float
) -> list[Detections]:
    """Convert torchvision-style detection output to :class:`Detections`, dropping low scores.

    Args:
        raw: one dict per tile with ``boxes`` (N, 4) xyxy in tile pixels, ``scores`` (N,) and
            ``labels`` (N,), any device; an instance segmenter's (Mask R-CNN) also ``masks``,
            (N, 1, H, W) or (N, H, W) on the tile's pixels (:func:`instance_masks`).
        score_threshold: keep boxes with ``score >= score_threshold``.
    """
    out: list[Detections] = []
    for det in raw:
        keep = det["scores"] >= score_threshold
        boxes = det["boxes"][keep].float().cpu().numpy().reshape(-1, 4)
        scores = det["scores"][keep].float().cpu().numpy()
        labels = det["labels"][keep].cpu().numpy().astype(np.int64, copy=False)
        masks = det.get("masks")
        crops = instance_masks(torch.as_tensor(masks)[keep]) if masks is not None else None
        out.append(Detections(boxes=boxes, scores=scores, labels=labels, masks=crops))
    return out


def instance_masks(masks: torch.Tensor) -> tuple[InstanceMask, ...]:
    """(N, 1, H, W) or (N, H, W) masks on a tile's pixels -> each object's pixels, cropped.

    A float mask is the object's probability per pixel (torchvision's Mask R-CNN pastes them
    onto the image): the object is where it is > 0.5; an integer or bool mask is the object
    where it is nonzero. Each crop is the bounding window of the object's pixels (a Mask R-CNN
    mask may reach a little past its box), found on the masks' device; the (N, H, W) bool
    masks then cross to the host once (1 byte per pixel), and only the crops are kept (a
    tile's 100 full masks of 512^2 would be 26 MB per tile in the part writer's queue).
    """
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be (N, 1, H, W) or (N, H, W); got {masks.shape}")
    on = masks > 0.5 if masks.is_floating_point() else masks != 0
    if not len(on):
        return ()
    rows, cols = on.any(dim=2), on.any(dim=1)  # (N, H), (N, W)
    height, width = rows.shape[1], cols.shape[1]
    first_row = torch.where(rows.any(1), rows.float().argmax(1), 0)
    last_row = torch.where(rows.any(1), height - rows.flip(1).float().argmax(1), 0)
    first_col = torch.where(cols.any(1), cols.float().argmax(1), 0)
    last_col = torch.where(cols.any(1), width - cols.flip(1).float().argmax(1), 0)
    windows = torch.stack([first_row, last_row, first_col, last_col], 1).cpu().numpy()
    host = on.cpu().numpy()
    return tuple(
        InstanceMask(int(r0), int(c0), host[i, r0:r1, c0:c1].copy())
        for i, (r0, r1, c0, c1) in enumerate(windows.tolist())
    )


def numbered_categories(n: int) -> tuple[str, ...]:
    """Class names ``"0"``, ``"1"``, ... for a model that knows its class count but no names.

    The same names :func:`mgpr.tasks.base.label_names` gives an unnamed class id.
    """
    return tuple(str(i) for i in range(n))


def classes_of_logits(k: int) -> int:
    """Classes a (B, K, H, W) logit tensor stands for: K, or 2 for one binary logit (K = 1)."""
    return 2 if k == 1 else k


def class_maps_from_logits(
    logits: torch.Tensor,
    probabilities: bool,
    size: tuple[int, int] | None = None,
    kind: OutputKind = "logits",
) -> list[ClassMap]:
    """Per-pixel argmax (and optionally softmax), computed on the logits' device, moved to the CPU.

    The argmax and softmax run in float32 whatever the autocast dtype of the network (a bf16
    tie would otherwise pick another class than fp32). Only the (B, H, W) ids cross to the host,
    as uint8 when K <= 256 (1 byte per pixel), plus (B, K, H, W) uint8 probabilities if asked.

    One channel (K = 1) is a binary model's logit (sigmoid): class 1 where it is above 0
    (p > 0.5), and the probabilities of classes 0 and 1 are ``1 - p`` and ``p``. Logits coarser
    (or finer) than the tile, as models with a stride-4 decoder return them, are resized to
    ``size`` bilinearly first (what torchvision's segmenters do inside their forward).

    ``kind="probabilities"`` (a module ending in softmax or sigmoid): the scores are used as
    they are: one channel is class 1 where p > 0.5, several the argmax, and the probabilities
    written are the module's own (clamped to [0, 1]), not a softmax of them.

    Args:
        logits: (B, K, H, W) raw class scores, any float dtype and device.
        probabilities: also return ``round(p * 255)`` per class (uint8).
        size: the tile's (H, W) in pixels; None keeps the logits' own size.
        kind: ``logits`` or ``probabilities`` (:data:`OutputKind`).

    Returns:
        B :class:`ClassMap` records on the tiles' pixel grids.
    """
    if logits.ndim != 4:
        raise ValueError(f"segmentation logits must be (B, K, H, W); got {tuple(logits.shape)}")
    scores = logits.float()
    if size is not None and tuple(scores.shape[-2:]) != tuple(size):
        scores = torch.nn.functional.interpolate(
            scores, size=size, mode="bilinear", align_corners=False
        )
    k = classes_of_logits(int(scores.shape[1]))
    if scores.shape[1] == 1:
        cut = 0.5 if kind == "probabilities" else 0.0  # p > 0.5 either way
        ids = (scores[:, 0] > cut).to(torch.uint8)
    else:
        ids = scores.argmax(dim=1)
    probs = class_probabilities_of(scores, kind) if probabilities else None
    ids_np = (
        ids.to(torch.uint8).cpu().numpy()
        if k <= 256
        else ids.to(torch.int32).cpu().numpy().astype(np.uint16)
    )
    probs_np: np.ndarray | None = None
    if probs is not None:
        probs_np = probs.mul_(255.0).round_().to(torch.uint8).cpu().numpy()
    return [
        ClassMap(class_ids=ids_np[i], probabilities=None if probs_np is None else probs_np[i])
        for i in range(ids_np.shape[0])
    ]


def class_maps_from_ids(ids: torch.Tensor, size: tuple[int, int] | None = None) -> list[ClassMap]:
    """(B, H, W) integer class ids (a model that does its own argmax) as :class:`ClassMap` s.

    Ids coarser than the tile are resized to ``size`` by nearest neighbour (ids are labels:
    nothing to interpolate). Ids outside 0..65534 raise ``ValueError``;
    :func:`check_class_maps` holds them to the model's class count.
    """
    if ids.ndim != 3 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"class ids must be an integer (B, H, W) tensor; got {ids.dtype}")
    if size is not None and tuple(ids.shape[-2:]) != tuple(size):
        ids = torch.nn.functional.interpolate(ids[:, None].float(), size=size, mode="nearest")[
            :, 0
        ].to(torch.int64)
    host = ids.to(torch.int64).cpu().numpy()
    if host.size and (host.min() < 0 or host.max() > 65534):
        raise ValueError(f"class ids must be in 0..65534; got {host.min()}..{host.max()}")
    dtype = np.uint8 if not host.size or host.max() <= 255 else np.uint16
    return [ClassMap(class_ids=host[i].astype(dtype)) for i in range(host.shape[0])]


def check_class_maps(maps: Sequence[Any], n_classes: int, tile_size: int, name: str) -> None:
    """Refuse class maps that would be written wrong: off the tile's grid, or ids >= the classes.

    A class map cast into a uint8 raster wraps id 300 to 44 and writes id 255 as nodata; a map
    of another shape lands on the wrong pixels. Both are a model bug, named here in one line
    before anything is written.

    Raises:
        ModelError: a map is not (tile_size, tile_size), or has an id >= ``n_classes``.
    """
    for m in maps:
        if not isinstance(m, ClassMap):
            continue
        if m.shape != (tile_size, tile_size):
            raise ModelError(
                f"model={name} returned a {m.shape[0]} x {m.shape[1]} class map for a "
                f"{tile_size} x {tile_size} px tile; return one class per tile pixel."
            )
        top = int(m.class_ids.max()) if m.class_ids.size else 0
        if top >= n_classes:
            raise ModelError(
                f"model={name} returned class id {top} but has {n_classes} categories "
                f"(ids 0..{n_classes - 1}); give it one category name per class id."
            )
