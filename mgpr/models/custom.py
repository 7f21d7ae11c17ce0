"""User models given by import path: ``model=my_pkg.my_module:build``.

The import path names a callable ``build(weights: str) -> ModelAdapter | torch.nn.Module`` that
receives the ``weights=`` string unchanged (it decides what it means: a path, a name, ignored).
Importing and calling it RUNS THAT CODE, by design: only point ``model=`` at code you trust.

* A returned :class:`~mgpr.models.base.ModelAdapter` is used as is.
* A returned ``torch.nn.Module`` is wrapped (:class:`ModuleAdapter`): it gets (B, C, H, W)
  float32 tiles in [0, 1] on the device (``value_range`` applied; a module attribute
  ``input_range = "raw"`` asks for float32 native raster values instead) and must return
  either a (B, K) tensor of class logits (-> classification: softmax, top-k; K = 1 is one
  binary logit: sigmoid, classes 0 and 1), a list of B
  dicts with ``boxes`` (N, 4) xyxy in tile pixels, ``scores`` (N,) and ``labels`` (N,)
  (-> detection, torchvision style), or (B, K, H, W) per-pixel class logits, bare or as the
  ``out`` entry of a dict as torchvision's segmentation models return them (-> segmentation:
  argmax per pixel; K = 1 is one binary logit: class 1 where it is > 0; logits coarser than
  the tile, e.g. a stride-4 decoder's, are resized bilinearly), or (B, H, W) integer class
  ids (resized by nearest neighbour; no probabilities), or, declared with
  ``task = "embedding"``, (B, D) features per tile or a (B, D, h, w) feature map averaged over
  its cells (-> one float32 vector per tile, :func:`~mgpr.models.base.pooled_features`).
  Optional attributes on the module steer the wrapper: ``task`` (``"classification"``,
  ``"detection"``, ``"segmentation"`` or ``"embedding"``; a segmenter and an embedder must
  declare it, since (B, C, H, W) out is also what an image-to-image module returns and (B, D)
  is also a classifier's logits; without it one probe forward on a zero tile on the CPU
  decides between classification and detection),
  ``categories`` (names by class id; for a classifier or segmenter one name is a binary
  model's positive class, id 1, after ``background``; a segmenter without them gets numbered
  names, its class count from ``num_classes`` or one probe forward), ``in_bands`` (else the
  ``in_channels`` of the first Conv2d its forward applies, else 0 = any), ``output_kind``
  (``"logits"``, the default, or ``"probabilities"``: a model ending in softmax / sigmoid,
  whose scores are used as they are; unmarked scores that look like probabilities are refused
  for a segmenter and warned about for a classifier, :func:`_refuse_unmarked_probabilities`).
  Per-pixel output must be channels-first: a non-square (..., H, W) is refused
  (:func:`_check_square`). A TorchScript module
  (``torch.jit.load(path)``) is wrapped the same way. A torchvision detector (``GeneralizedRCNN``:
  Faster/Mask/Keypoint R-CNN; ``RetinaNet``, ``FCOS``, ``SSD``) computes its boxes in float32
  under mixed precision, like the built-in detector
  (:func:`~mgpr.models.detection.exact_detector_forward`); any other detector's coordinates are
  in whatever dtype its forward produces under autocast.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mgpr.errors import ConfigError, MgprError, ModelError
from mgpr.models.base import (
    INPUT_RANGES,
    OUTPUT_KINDS,
    TASKS,
    ChannelNormaliser,
    Classification,
    ClassMap,
    Detections,
    Embedding,
    ModelAdapter,
    OutputKind,
    Task,
    class_maps_from_ids,
    class_maps_from_logits,
    classes_of_logits,
    classifications_from_logits,
    detections_from_dicts,
    embeddings_from_features,
    numbered_categories,
)

logger = logging.getLogger(__name__)

_DET_KEYS = ("boxes", "scores", "labels")

#: What each task's raw output must be, for messages.
_NEEDS: dict[str, str] = {
    "classification": "(B, K) logits",
    "detection": "a list of dicts with boxes/scores/labels",
    "segmentation": "(B, K, H, W) pixel logits or (B, H, W) integer class ids",
    "embedding": "(B, D) features or a (B, D, h, w) feature map",
}


def split_import_path(path: str) -> tuple[str, str]:
    """Split ``pkg.mod:attr.sub`` (or ``pkg.mod.attr``) into module and attribute path.

    Raises:
        ModelError: no module or no attribute part.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ModelError(
            f"model={path} is not an import path; write it as package.module:function, "
            "e.g. model=my_pkg.my_module:build."
        )
    return module_name, attr


def load_builder(path: str) -> Any:
    """Import ``path`` and return the object it names (runs the module's code).

    Raises:
        ModelError: the module does not import, or the attribute is missing.
    """
    module_name, attr = split_import_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(
            f"model={path}: module '{module_name}' does not import ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); check the name and that it is on PYTHONPATH."
        ) from err
    except Exception as err:  # noqa: BLE001 - the module is found but its own code fails
        raise ModelError(
            f"model={path}: module '{module_name}' was found but raised while importing "
            f"({type(err).__name__}: {' '.join(str(err).split())[:150]}{_where(err)}); "
            "fix that module (run `python -c 'import "
            f"{module_name}'` to see the traceback)."
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(
                f"model={path}: module '{module_name}' has no attribute '{attr}'; "
                "name an existing function, e.g. model=my_pkg.my_module:build."
            )
        obj = getattr(obj, part)
    return obj


def _where(err: BaseException) -> str:
    """`` at file:line`` of the innermost frame of ``err`` (SyntaxError: the bad line)."""
    import traceback

    if isinstance(err, SyntaxError) and err.filename:
        return f" at {err.filename}:{err.lineno}"
    frames = traceback.extract_tb(err.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _conv_in_channels(module: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """Every Conv2d of ``module`` with its input channels, in registration order.

    A TorchScript module's convolutions are ``RecursiveScriptModule`` s whose
    ``original_name`` is ``Conv2d``; a traced one keeps only its weight, (out, in / groups,
    kh, kw).
    """
    convs: list[tuple[torch.nn.Module, int]] = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            convs.append((sub, int(sub.in_channels)))
        elif getattr(sub, "original_name", None) == "Conv2d":
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 4:
                convs.append((sub, int(weight.shape[1]) * int(getattr(sub, "groups", 1))))
    return convs


class _ConvReached(Exception):
    """Raised by a forward pre-hook to stop a forward at its first convolution."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels)
        self.in_channels = in_channels


def _first_applied_conv(
    module: torch.nn.Module, convs: Sequence[tuple[torch.nn.Module, int]], tile_size: int
) -> int | None:
    """Input channels of the first Conv2d the forward applies, or None if none was reached.

    A module may register its head before its encoder (``self.head = Conv2d(16, 2, 1)`` first):
    the first REGISTERED convolution then says 16 bands for an RGB model. Each candidate band
    count is tried on a zero tile until a forward reaches a convolution, which stops it (a
    pre-hook raises): cheap, nothing past the first layer runs.
    """
    hooks = [
        conv.register_forward_pre_hook(lambda m, _args, c=c: _raise_reached(c)) for conv, c in convs
    ]
    try:
        for bands in dict.fromkeys(c for _, c in convs):  # distinct, registration order
            try:
                with torch.inference_mode():
                    module(torch.zeros(1, bands, tile_size, tile_size))
            except _ConvReached as reached:
                return reached.in_channels
            except Exception:  # noqa: BLE001, S112 - this band count fails before any conv
                continue
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _raise_reached(in_channels: int) -> None:
    raise _ConvReached(in_channels)


def _guess_in_bands(module: torch.nn.Module, name: str, tile_size: int) -> int:
    """Bands a module without ``in_bands`` takes: its first applied Conv2d's ``in_channels``.

    0 (any band count) without a convolution. When its convolutions take different channel
    counts, the first one the forward applies decides (:func:`_first_applied_conv`), so the
    order the layers were registered in does not; TorchScript modules (no hooks) take the
    first registered one.
    """
    convs = _conv_in_channels(module)
    if not convs:
        return 0
    first = convs[0][1]
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in (module, *(c for c, _ in convs)))
    if len({c for _, c in convs}) == 1 or scripted:
        return first
    module.eval()
    applied = _first_applied_conv(module, convs, tile_size)
    if applied is not None and applied != first:
        logger.info(
            "model=%s: its first registered Conv2d takes %d channels, but the first its "
            "forward applies takes %d: it gets %d bands (set `in_bands` on the module to say so)",
            name,
            first,
            applied,
            applied,
        )
        return applied
    return first


def _segmentation_logits(out: Any) -> Any:
    """Torchvision segmentation style ``{"out": logits, ...}`` -> the logits; else ``out``."""
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        return out["out"]
    return out


def _is_class_ids(out: Any) -> bool:
    """A (B, H, W) integer tensor: per-pixel class ids of a model that does its own argmax."""
    return (
        isinstance(out, torch.Tensor)
        and out.ndim == 3
        and not out.is_floating_point()
        and not out.is_complex()
        and out.dtype != torch.bool
    )


def _kind_of_output(out: Any, batch: int) -> Task | None:
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == batch:
        return "classification"
    seg = _segmentation_logits(out)
    if isinstance(seg, torch.Tensor) and seg.shape[0] == batch:
        if seg.ndim == 4 or _is_class_ids(seg):
            return "segmentation"
    if (
        isinstance(out, (list, tuple))
        and len(out) == batch
        and all(isinstance(d, dict) and all(k in d for k in _DET_KEYS) for d in out)
    ):
        return "detection"
    return None


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (list, tuple)) and out:
        return f"a {type(out).__name__} of {type(out[0]).__name__}"
    return f"a {type(out).__name__}"


def _check_square(out: torch.Tensor, tile_size: int, name: str) -> None:
    """Refuse per-pixel output whose last two dimensions are not square, as tiles are.

    Channels-last logits (B, H, W, K), e.g. after ``.permute(0, 2, 3, 1)``, read as
    channels-first were 256 "classes" on a 256 x 3 map, stretched to the tile and written with
    exit 0. Square outputs of another size than the tile (a strided decoder's, a module that
    resizes its input) are resized, as before.

    Raises:
        ModelError: (..., H, W) with H != W.
    """
    h, w = int(out.shape[-2]), int(out.shape[-1])
    if h == w:
        return
    if out.ndim == 4:
        raise ModelError(
            f"model={name} returned per-pixel output of shape {tuple(out.shape)} for "
            f"{tile_size} x {tile_size} px tiles, whose last two dimensions ({h} x {w}) are not "
            "a square grid: channels-last (B, H, W, classes) output reads so; return "
            "channels-first (B, classes, H, W) logits, e.g. out.permute(0, 3, 1, 2)."
        )
    raise ModelError(
        f"model={name} returned class ids of shape {tuple(out.shape)} for {tile_size} x "
        f"{tile_size} px tiles, which are not a square (B, H, W) grid; return one id per tile "
        "pixel, (B, H, W) with H = W."
    )


def _score_stats(scores: torch.Tensor) -> tuple[float, float, float, bool]:
    """Min, max, worst ``|sum over dim 1 - 1|`` (0 for one channel), and any value in (0, 1).

    One device sync (the stats are stacked before they are read).
    """
    s = scores.float()
    dev = (s.sum(dim=1) - 1).abs().max() if s.shape[1] > 1 else s.new_zeros(())
    frac = ((s > 0) & (s < 1)).any().float()
    lo, hi, worst, any_frac = torch.stack([s.min(), s.max(), dev, frac]).tolist()
    return float(lo), float(hi), float(worst), bool(any_frac)


#: Slack of the probability checks: float32 softmax rows sum to 1 within ~1e-6, fp16 ~1e-3.
_PROB_TOL = 1e-3


def _refuse_unmarked_probabilities(
    scores: torch.Tensor, name: str, task: str, whole_batch: bool
) -> None:
    """Refuse (or warn about) class scores that look like probabilities from an unmarked module.

    A module exported with ``activation="sigmoid"`` / ``"softmax"`` read as logits: one
    channel became class 1 wherever p > 0 (every pixel), several got a second softmax (a
    classifier's 1.0 became 0.475). Scores look like probabilities when every value lies in
    [0, 1], not all exactly 0 or 1 (one-hot output gives the same class either way), and, with
    several classes, every row / pixel sums to 1 within 1e-3. For a module without
    ``output_kind``:

    * per-pixel scores (segmentation): refused, thousands of values say it beyond doubt. With
      several classes at the build's probe too (real logits do not sum to 1 on a zero tile
      either), with one channel on the first batch only (``whole_batch``: a zero tile's logit
      may well lie in [0, 1]);
    * a classifier's (B, K) scores: one warning, at the first batch: a few rows that real
      logits may give (a toy module's ``[m, 1 - m]``), and with several classes the top class
      is the same either way, only its score is not.

    Raises:
        ModelError: the segmentation refusals above, naming ``output_kind``.
    """
    k = int(scores.shape[1])
    if k == 1 and not whole_batch:
        return
    lo, hi, worst, any_frac = _score_stats(scores)
    if not (lo >= -_PROB_TOL and hi <= 1 + _PROB_TOL and any_frac) or worst > _PROB_TOL:
        return
    seen = (
        f"{k} class scores per {'pixel' if task == 'segmentation' else 'tile'} that all lie in "
        f"[0, 1] and sum to 1: softmax probabilities, which mgpr reads as logits (a second "
        f"softmax squashes them towards 1/{k})"
        if k > 1
        else f"one class score per {'pixel' if task == 'segmentation' else 'tile'}, every one "
        f"in a batch within [0, 1] ({lo:.3g}..{hi:.3g}): sigmoid probabilities, which mgpr "
        f"reads as a logit (class 1 wherever it is > 0: everywhere)"
    )
    fix = (
        'set `output_kind = "probabilities"` on the module to use them as they are'
        + (" (class 1 where p > 0.5)" if k == 1 else "")
        + ', or `output_kind = "logits"` if they are logits'
    )
    if task == "segmentation":
        raise ModelError(f"model={name} returned {seen}; {fix}.")
    logger.warning("model=%s returned %s; %s (warned once)", name, seen, fix)


class ModuleAdapter(ModelAdapter):
    """Wraps a plain ``torch.nn.Module`` returned by a user's ``build`` (see module docstring)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        weights: str,
        topk: int,
        score_threshold: float,
        tile_size: int,
        probabilities: bool = False,
    ) -> None:
        in_bands = getattr(module, "in_bands", None)
        in_bands = (
            int(in_bands) if in_bands is not None else _guess_in_bands(module, name, tile_size)
        )
        output_kind = getattr(module, "output_kind", None)
        if output_kind is not None and output_kind not in OUTPUT_KINDS:
            raise ModelError(
                f"model={name} has output_kind={output_kind!r}; set it to 'logits' (softmax, or "
                "sigmoid for one channel, applied by mgpr) or 'probabilities' (already "
                "softmax / sigmoid: used as they are)."
            )
        #: what the module's class scores are, and whether it said so (else checked once).
        self.output_kind: OutputKind = output_kind or "logits"
        self._scores_checked = output_kind is not None
        task = getattr(module, "task", None)
        #: a classifier's logits per tile (K; 1 = one binary sigmoid logit), from the probe or
        #: the first :meth:`classifier_logits` call; None until known.
        self._logits: int | None = None
        if task is None:
            task, probed = self._probe(module, name, in_bands or 3, tile_size)
            if task == "classification":
                self._logits = int(probed.shape[1])
        self._probe_bands, self._probe_tile = in_bands or 3, tile_size
        categories = getattr(module, "categories", None)
        if categories is not None and len(categories) == 1 and task != "detection":
            # One name is a binary (one-logit) model's positive class; id 0 is the rest. Not
            # for detectors: their one class may be label 0 (DeepForest) or 1 (torchvision).
            categories = ("background", str(categories[0]))
        if task == "segmentation":
            categories = self._segmentation_categories(
                module, name, in_bands or 3, tile_size, categories
            )
        if task == "embedding":
            categories = None  # features have no classes
        if (
            task == "classification"
            and categories is not None
            and self._logits is not None
            and classes_of_logits(self._logits) != len(categories)
        ):  # the probe sized it: refused at build, not at the first batch
            raise ModelError(
                f"model={name} returns {self._logits} class logit(s) per tile but names "
                f"{len(categories)} categories; give one name per class (a single logit is a "
                "binary classifier: one name, its positive class)."
            )
        super().__init__(
            name=name,
            task=task,
            categories=tuple(categories) if categories is not None else None,
            in_bands=in_bands,
            random_weights=bool(getattr(module, "random_weights", False)),
            weights_id=weights,
            module=module,
        )
        input_range = getattr(module, "input_range", "unit")
        if input_range not in INPUT_RANGES:
            raise ModelError(
                f"model={name} has input_range={input_range!r}; set it to 'unit' (float32 in "
                "[0, 1], value_range applied) or 'raw' (float32 native raster values)."
            )
        self.input_range = input_range
        #: ``mean``/``std`` (:meth:`set_normalisation`), or None: the tiles as they are
        self._normalise: ChannelNormaliser | None = None
        logger.info(
            "model=%s: the module gets float32 %s with no normalisation (no ImageNet mean/std, "
            "unlike the built-in models): a network trained on normalised input must "
            "normalise inside its forward, or the run must set mean= and std=",
            name,
            "native raster values (input_range=raw)"
            if input_range == "raw"
            else "tiles in [0, 1] (value_range applied)",
        )
        self.topk = topk
        self.score_threshold = score_threshold
        #: segmentation: also return per-class uint8 probabilities per tile.
        self.probabilities = probabilities
        self._backbone: Callable[[torch.Tensor], Any] | None = None
        #: detection: boxes wholly outside the tile were reported once (per process).
        self._outside_reported = False
        #: embedding: the feature length of the first batch (every tile's must be the same).
        self._embedding_dim: int | None = None

    def forward(self, inputs: torch.Tensor) -> Any:
        """The module's output; a torchvision detector with float32 boxes under autocast."""
        from mgpr.models.detection import exact_detector_forward, is_torchvision_detector

        if is_torchvision_detector(self.module):
            return exact_detector_forward(self.module, list(inputs.unbind(0)), self._backbone)
        return self._network(inputs)

    def compile(self, compiler: Callable[[torch.nn.Module], Callable[..., Any]]) -> None:
        """Compile the module; a torchvision detector's backbone only, as the built-in one.

        The rest (heads, anchors, NMS; data-dependent shapes in an R-CNN) runs eager, its box
        path in float32.
        """
        from mgpr.models.detection import is_torchvision_detector

        if is_torchvision_detector(self.module):
            self._backbone = compiler(self.module.backbone)
        else:
            super().compile(compiler)

    def class_scores(self, raw: Any) -> torch.Tensor:
        """The module's logits (``out`` of a torchvision-style dict too), for ``tta=``."""
        raw = _segmentation_logits(raw)
        if _is_class_ids(raw):
            raise ModelError(
                f"model={self.name} returns class ids (B, H, W), which carry no class "
                "probabilities: tta= needs (B, K, H, W) logits to average; return logits or "
                "unset tta."
            )
        scores = super().class_scores(raw)
        self._check_scores(scores)
        if self.output_kind == "logits":
            return scores
        p = scores.float().clamp(0.0, 1.0)  # tta's softmax / sigmoid of these gives p back
        return torch.logit(p, eps=1e-7) if p.shape[1] == 1 else p.clamp_min(1e-30).log()

    def with_class_scores(self, scores: torch.Tensor) -> Any:
        """The views' mean log-probabilities as the module would return them.

        A module with ``output_kind = "probabilities"`` gets probabilities back (the
        postprocess uses them as they are); otherwise the log-probabilities, read as logits.
        """
        return scores.exp() if self.output_kind == "probabilities" else scores

    def _check_scores(self, scores: torch.Tensor) -> None:
        """Check the first batch's class scores against ``output_kind``, once per process.

        Unmarked scores that look like probabilities are refused
        (:func:`_refuse_unmarked_probabilities`); declared probabilities outside [0, 1]
        (logits under a wrong declaration) too. One device sync, on the first batch only.
        """
        if self._scores_checked:
            if self.output_kind == "probabilities" and not getattr(self, "_range_checked", 0):
                self._range_checked = True
                lo, hi, _, _ = _score_stats(scores)
                if lo < -_PROB_TOL or hi > 1 + _PROB_TOL:
                    raise ModelError(
                        f"model={self.name} declares output_kind = 'probabilities' but returned "
                        f"class scores from {lo:.3g} to {hi:.3g}; return probabilities in [0, 1] "
                        "(end the forward in softmax or sigmoid) or set output_kind = 'logits'."
                    )
            return
        self._scores_checked = True
        _refuse_unmarked_probabilities(scores, self.name, self.task, whole_batch=True)

    def _class_maps(self, raw: torch.Tensor, tile_size: int) -> list[ClassMap]:
        """Logits or class ids -> one :class:`ClassMap` per tile, on the tile's pixel grid.

        The class count is the one fixed at build (:meth:`_segmentation_categories`): logits
        with another channel count are a model bug, refused here rather than written wrong.
        """
        assert self.categories is not None
        n = len(self.categories)
        size = (tile_size, tile_size)
        _check_square(raw, tile_size, self.name)
        if raw.ndim == 3:
            if self.probabilities:
                raise ModelError(
                    f"model={self.name} returns class ids (B, H, W), which carry no class "
                    "probabilities: probabilities=true and seam=blend need (B, K, H, W) "
                    "logits; unset probabilities and use seam=crop, or return logits."
                )
            try:
                return class_maps_from_ids(raw, size)
            except ValueError as err:
                raise ModelError(f"model={self.name}: {err}; return ids 0..{n - 1}.") from err
        k = int(raw.shape[1])
        if classes_of_logits(k) != n:
            raise ModelError(
                f"model={self.name} returned {k} class channel(s) but names {n} categories; "
                "give one category per channel (a single channel is a binary logit: 2)."
            )
        self._check_scores(raw)
        return class_maps_from_logits(raw, self.probabilities, size, self.output_kind)

    def _embeddings(self, raw: Any) -> list[Embedding]:
        """Features -> one :class:`Embedding` per tile, every batch of the run the same length.

        A feature length that changes between batches (a model whose pooling depends on the
        input) would give a table whose rows cannot be compared; refused at the batch.
        """
        out = embeddings_from_features(raw, self.name)
        if out:
            dim = int(out[0].vector.shape[0])
            if self._embedding_dim is None:
                self._embedding_dim = dim
            elif dim != self._embedding_dim:
                raise ModelError(
                    f"model={self.name} returned {dim} features per tile after "
                    f"{self._embedding_dim} in an earlier batch; return the same length for "
                    "every tile."
                )
        return out

    @staticmethod
    def _segmentation_categories(
        module: torch.nn.Module,
        name: str,
        bands: int,
        tile_size: int,
        categories: Any,
    ) -> tuple[str, ...]:
        """Class names of a user's segmenter: its ``categories``, else numbered ones.

        The count comes from ``categories``, else a ``num_classes`` attribute, else one probe
        forward (its channel count; one binary logit channel is 2 classes). Class ids without
        a count cannot be sized: refused with the attribute to set.
        """
        if categories is not None:
            return tuple(str(c) for c in categories)
        declared = getattr(module, "num_classes", None)
        if declared is not None:
            return numbered_categories(int(declared))
        out = _segmentation_logits(
            ModuleAdapter._forward_zero_tile(module, name, bands, tile_size, "num_classes")
        )
        if isinstance(out, torch.Tensor) and out.ndim in (3, 4):
            _check_square(out, tile_size, name)
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            if out.is_floating_point() and getattr(module, "output_kind", None) is None:
                _refuse_unmarked_probabilities(out, name, "segmentation", whole_batch=False)
            return numbered_categories(classes_of_logits(int(out.shape[1])))
        if _is_class_ids(out):
            raise ModelError(
                f"model={name} returns class ids (B, H, W), so mgpr cannot tell how many "
                "classes it has; set `num_classes` (or `categories`, one name per class id) "
                "on the module."
            )
        raise ModelError(
            f"model={name} declares task 'segmentation' but returns {_describe(out)}; "
            f"return {_NEEDS['segmentation']}."
        )

    @staticmethod
    def _forward_zero_tile(
        module: torch.nn.Module, name: str, bands: int, tile_size: int, skip_with: str
    ) -> Any:
        """One zero tile (1, bands, tile_size, tile_size) through the module on the CPU."""
        module.eval()
        try:
            with torch.inference_mode():
                return module(torch.zeros(1, bands, tile_size, tile_size))
        except Exception as err:  # noqa: BLE001 - reported with the fix, chained for the traceback
            bands_hint = (
                f"set an `in_bands` attribute on the module if it takes another band count than "
                f"{bands}, "
                if getattr(module, "in_bands", None) is None
                else ""
            )
            raise ModelError(
                f"model={name}: the module fails on a (1, {bands}, {tile_size}, {tile_size}) "
                f"float tile ({type(err).__name__}: {' '.join(str(err).split())[:150]}); fix it, "
                f"{bands_hint}or set a `{skip_with}` attribute on the module to skip this probe."
            ) from err

    def classifier_logits(self) -> int:
        """Logits per tile of a user's classifier (1: one binary sigmoid logit = 2 classes).

        From a ``num_classes`` attribute, the build's probe, or one zero-tile forward on the
        CPU, so ``categories=`` is checked against the model before any tile.
        """
        if self._logits is None:
            declared = getattr(self.module, "num_classes", None)
            if declared is not None:
                self._logits = int(declared)
            else:
                out = self._forward_zero_tile(
                    self.module, self.name, self._probe_bands, self._probe_tile, "num_classes"
                )
                if _kind_of_output(out, 1) != "classification":
                    raise ModelError(
                        f"model={self.name} declares task 'classification' but returns "
                        f"{_describe(out)}; return {_NEEDS['classification']}."
                    )
                self._logits = int(out.shape[1])
        return self._logits

    @staticmethod
    def _probe(module: torch.nn.Module, name: str, bands: int, tile_size: int) -> tuple[Task, Any]:
        """Run one zero tile (1, bands, tile_size, tile_size) on the CPU to see the output kind.

        Returns the kind and the module's output (a classifier's logits size its classes).
        """
        out = ModuleAdapter._forward_zero_tile(module, name, bands, tile_size, "task")
        kind = _kind_of_output(out, 1)
        if kind == "segmentation":
            # (B, C, H, W) out is also what an image-to-image module (or a bug: Identity)
            # returns, so a segmenter must say so.
            raise ModelError(
                f"model={name}: the module returns {_describe(out)}; if these are per-pixel "
                'class logits set `task = "segmentation"` on the module, else return (B, K) '
                "class logits or a list of B dicts with boxes/scores/labels."
            )
        if kind is None:
            raise ModelError(
                f"model={name}: the module returns {_describe(out)}; return (B, K) class logits "
                "or a list of B dicts with boxes/scores/labels (a segmenter: set "
                '`task = "segmentation"` and return (B, K, H, W) logits; an embedder: set '
                '`task = "embedding"` and return (B, D) features).'
            )
        logger.info("model=%s: probe output is %s", name, kind)
        return kind, out

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """``(x - mean) / std`` on the [0, 1] tiles before the module (the ``mean``/``std`` keys).

        Raises:
            ConfigError: a module asking for raw values (its statistics are not in [0, 1]
                units), or another count than its bands.
        """
        if self.input_range == "raw":
            raise ConfigError(
                f"mean/std: model={self.name} asks for raw values (input_range = 'raw'), which "
                "the keys' [0, 1] statistics do not describe; normalise inside its forward or "
                "leave mean and std out"
            )
        self._check_band_count(mean)
        self._normalise = ChannelNormaliser(mean, std)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pass the scaled (B, C, H, W) float32 tiles (in [0, 1], or raw values) to the module.

        With ``mean``/``std`` given, normalised first, in place on the device.
        """
        return images if self._normalise is None else self._normalise(images)

    def postprocess(
        self, raw: Any, tile_size: int
    ) -> list[Detections] | list[Classification] | list[ClassMap] | list[Embedding]:
        """Turn the module's output into the records of its task.

        (B, K) logits: softmax, top-k; dicts: :class:`Detections` (score threshold);
        (B, K, H, W) logits: per-pixel argmax, :class:`ClassMap`; an embedder's features:
        one :class:`Embedding` per tile.
        """
        raw = _segmentation_logits(raw)
        if self.task == "embedding":
            return self._embeddings(raw)
        batch = raw.shape[0] if isinstance(raw, torch.Tensor) else len(raw)
        kind = _kind_of_output(raw, batch)
        if kind != self.task:
            raise ModelError(
                f"model={self.name} returned {_describe(raw)} where its task '{self.task}' "
                f"needs {_NEEDS[self.task]}; fix its forward."
            )
        if kind == "segmentation":
            return self._class_maps(raw, tile_size)
        if kind == "classification":
            classes = classes_of_logits(int(raw.shape[1]))
            if self.categories is not None and classes != len(self.categories):
                raise ModelError(
                    f"model={self.name} returned {int(raw.shape[1])} class logit(s) per tile but "
                    f"names {len(self.categories)} categories; give one name per class "
                    "(a single logit is a binary classifier: one name, its positive class)."
                )
            self._check_scores(raw)
            return classifications_from_logits(raw, self.topk, self.output_kind)
        dets = [{k: torch.as_tensor(d[k]) for k in _DET_KEYS} for d in raw]  # numpy/lists too
        for det, given in zip(dets, raw, strict=True):
            if given.get("masks") is not None:  # an instance segmenter (Mask R-CNN style)
                det["masks"] = _checked_masks(
                    given["masks"], len(det["scores"]), tile_size, self.name
                )
        outside = _check_box_frame(dets, self.name, tile_size)
        if outside and not self._outside_reported:
            self._outside_reported = True
            count, example = outside
            logger.warning(
                "model=%s returned %d box(es) wholly outside its %d px tile in one batch (e.g. "
                "%s), which are dropped; boxes must be (x1, y1, x2, y2) in the tile's pixels, "
                "0..%d: if the module resizes its input, scale its boxes back (reported once)",
                self.name,
                count,
                tile_size,
                example,
                tile_size,
            )
        return detections_from_dicts(dets, self.score_threshold)


def _checked_masks(masks: Any, n: int, tile_size: int, name: str) -> torch.Tensor:
    """A user detector's ``masks``: one (1, H, W) or (H, W) mask per box on the tile's pixels.

    Raises:
        ModelError: another count or another size than the tile's (a mask per box cropped to
            the box, or a model's internal resolution, would land on the wrong pixels).
    """
    t = torch.as_tensor(masks)
    shape = tuple(t.shape)
    if t.ndim == 4 and t.shape[1] == 1:
        shape = (shape[0], *shape[2:])
    if len(shape) != 3 or shape[0] != n or shape[1:] != (tile_size, tile_size):
        raise ModelError(
            f"model={name} returned masks of shape {tuple(t.shape)} for {n} box(es) on a "
            f"{tile_size} px tile; return one ({n}, 1, {tile_size}, {tile_size}) mask per box "
            "on the tile's pixels, as torchvision's Mask R-CNN does."
        )
    return t


def _check_box_frame(
    dets: Sequence[dict[str, torch.Tensor]], name: str, tile_size: int
) -> tuple[int, list[float]] | None:
    """Refuse boxes that are not tile-pixel corners; return boxes wholly outside the tile.

    mgpr takes torchvision's (x1, y1, x2, y2) corners in tile pixels. Two other conventions
    are refused, as each ended in exit 0 with wrong or no results and no word why:

    * (x, y, w, h) or (cx, cy, w, h): most boxes have x2 < x1 or y2 < y1 when read as corners,
      and the merge dropped them as empty;
    * normalised coordinates (0..1 of the tile, as DETR / YOLO exports give): every box lay
      within the tile's first pixel. Refused when a batch has at least 2 boxes and every
      coordinate is in [0, 1] on tiles of 8 px or more; a real detector puts no two boxes
      there.

    Boxes wholly outside the tile (a module that resized its input and did not scale its
    boxes back) are clipped to nothing later; they are returned as ``(count, first box)``
    for one warning. One device sync per batch.
    """
    if not dets:
        return None
    boxes_per_tile = [det["boxes"].reshape(-1, 4) for det in dets]
    boxes = torch.cat([b.float() for b in boxes_per_tile])
    if not len(boxes):
        return None
    inverted = [(b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]) for b in boxes_per_tile]
    away = (
        (boxes[:, 0] >= tile_size)
        | (boxes[:, 1] >= tile_size)
        | (boxes[:, 2] <= 0)
        | (boxes[:, 3] <= 0)
    )
    unit = (boxes >= 0).all() & (boxes <= 1.0).all()
    flags = torch.stack(
        [torch.stack([bad.any() for bad in inverted]).any().float(), unit.float(), away.sum()]
    ).tolist()  # the one device sync
    any_inverted, all_unit, n_away = bool(flags[0]), bool(flags[1]), int(flags[2])
    if all_unit and len(boxes) >= 2 and tile_size >= 8:
        first = [round(float(v), 3) for v in boxes[0].tolist()]
        raise ModelError(
            f"model={name} returned {len(boxes)} boxes in one batch whose every coordinate is "
            f"within 0..1 (e.g. {first}): normalised boxes; mgpr expects (x1, y1, x2, y2) in "
            f"tile pixels, as torchvision: multiply x by the tile's width and y by its height "
            f"({tile_size} px) before returning them"
            + (
                ", and convert (cx, cy, w, h) ones with torchvision.ops.box_convert(boxes, "
                "'cxcywh', 'xyxy')."
                if any_inverted
                else "."
            )
        )
    if not any_inverted:
        return (n_away, [round(float(v), 2) for v in boxes[away][0].tolist()]) if n_away else None
    for i, (tile_boxes, bad) in enumerate(zip(boxes_per_tile, inverted, strict=True)):
        if bool(bad.any()):
            first = [round(float(v), 2) for v in tile_boxes[bad][0].tolist()]
            raise ModelError(
                f"model={name} returned a box {first} (tile {i} of the batch) whose x2 < x1 or "
                "y2 < y1; mgpr expects (x1, y1, x2, y2) corners in tile pixels, as torchvision: "
                "convert (x, y, w, h) or (cx, cy, w, h) boxes with "
                "torchvision.ops.box_convert(boxes, 'xywh' or 'cxcywh', 'xyxy')."
            )


def as_cpu_float32(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The user's module with float32 parameters and buffers, on the CPU.

    mgpr feeds float32 tiles and decides the compute precision itself (``precision``,
    autocast), and Lightning moves the module to each rank's device: a module built with
    ``.half()``, ``.to(torch.bfloat16)`` or ``.double()`` otherwise failed at its first forward
    ("Input type (torch.FloatTensor) and weight type (torch.HalfTensor) should be the same"),
    and one built on ``cuda:0`` made every rank allocate on GPU 0 (and broke the CPU probe).
    Integer (quantised) tensors are left as they are.
    """
    tensors = [*module.parameters(), *module.buffers()]
    floats = {str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}
    devices = {str(t.device) for t in tensors}
    changed = []
    if floats - {"float32"}:
        changed.append(f"{'/'.join(sorted(floats - {'float32'}))} -> float32")
    if devices - {"cpu"}:
        changed.append(f"{'/'.join(sorted(devices - {'cpu'}))} -> cpu until each rank moves it")
    if changed:
        logger.info(
            "model=%s: the module's tensors are %s; it computes in the run's precision "
            "(precision=16-mixed or bf16-mixed for half-precision compute)",
            name,
            ", ".join(changed),
        )
        module = module.to("cpu")
        module = module.float()
    return module


def _check_takes_weights(builder: Callable[..., Any], path: str) -> None:
    """Refuse a builder that cannot be called with one positional argument (``weights``).

    Checked on the signature, before the call: a ``TypeError`` raised inside a user's build
    is their bug (:func:`_call_build` names its line), while ``def build():`` is a mistake
    about mgpr's contract and gets this line.
    """
    import inspect

    try:
        inspect.signature(builder).bind("DEFAULT")
    except TypeError:
        raise ModelError(
            f"model={path} cannot be called as build(weights): its signature is "
            f"{path.split(':')[-1].split('.')[-1]}{inspect.signature(builder)}; give it one "
            "parameter, e.g. def build(weights: str) -> torch.nn.Module (weights= is passed "
            "as given: DEFAULT, none or a path)."
        ) from None
    except ValueError:  # no signature to read (some builtins): let the call decide
        return


def _call_build(builder: Callable[..., Any], path: str, weights: str) -> Any:
    """``builder(weights)``; an exception it raises becomes one line naming where and why.

    The usual failures are the user's own: a checkpoint path that does not exist (with no
    ``weights=`` the build receives ``DEFAULT``), a state_dict that does not fit. They dumped
    ~60 lines of mgpr's frames with exit 1 and left the rank's log without the error; now the
    line names the exception, its first line and the user's file:line, exits 2, and the full
    traceback goes to ``logs/rank<R>.log`` only. An :class:`MgprError` (a build that calls
    mgpr) passes unchanged.

    Raises:
        ModelError: the build raised an ``Exception``.
    """
    try:
        return builder(weights)
    except MgprError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: one line, the traceback logged
        logger.error(
            "model=%s: %s(%r) raised", path, path, weights, exc_info=err, extra={"file_only": True}
        )
        logs = [  # this rank's log file (mgpr.run.logs.RANK_LOG_HANDLER), when a run set it up
            h.baseFilename
            for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and h.get_name() == "mgpr-rank-log"
        ]
        raise ModelError(
            f"model={path}: {path.split(':')[-1]}({weights!r}) raised {type(err).__name__}: "
            f"{_first_lines(err)}{_user_frame(err)}; {_build_fix(err, weights)}"
            + (f" (the full traceback is in {logs[0]})." if logs else ".")
        ) from err


def _first_lines(err: BaseException) -> str:
    """The message's first line (and the next one where the first only introduces it).

    ``load_state_dict`` says ``Error(s) in loading state_dict for Net:`` and the missing keys
    on the line after; 200 characters at most.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    text = text if len(text) <= 200 else text[:197] + "..."
    return text.rstrip(" .")  # the sentence goes on after it


def _user_frame(err: BaseException) -> str:
    """`` at file:line`` of the innermost frame in the user's code (not mgpr, torch, stdlib).

    The innermost frame of a torch.load failure is torch/serialization.py, which says nothing
    about which line of the build to fix. A frame counts as library code when its file lies
    under the interpreter's stdlib or site-packages, or in mgpr; without a user frame, the
    innermost one.
    """
    import sysconfig
    import traceback

    import mgpr

    library = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    library.add(str(Path(mgpr.__file__).parent))
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if not any(frame.filename.startswith(root + os.sep) for root in library):
            return f" at {frame.filename}:{frame.lineno}"
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _build_fix(err: BaseException, weights: str) -> str:
    """What to do: give ``weights=`` when the failure is about the path ``DEFAULT``."""
    if weights == "DEFAULT" and (
        getattr(err, "filename", None) == "DEFAULT" or "'DEFAULT'" in str(err)
    ):
        return (
            "weights= was not given, so build received 'DEFAULT' (weights= is passed as given); "
            "pass weights=/path/to/checkpoint.pth"
        )
    return "fix the build function (or its weights=)"


def build_custom(
    path: str,
    weights: str = "DEFAULT",
    *,
    topk: int = 5,
    score_threshold: float = 0.05,
    tile_size: int = 512,
    probabilities: bool = False,
) -> ModelAdapter:
    """Import ``path``, call it with ``weights``, and return an adapter.

    Args:
        path: ``package.module:function`` (or ``package.module.function``).
        weights: passed unchanged to the function.
        topk: classes kept per tile when a wrapped module classifies.
        score_threshold: boxes kept when a wrapped module detects.
        tile_size: tile edge in pixels (size of the probe tile).
        probabilities: a wrapped module that segments also returns uint8 class probabilities.

    Raises:
        ModelError: does not import, attribute missing, not callable, or returns something that
            is neither a ModelAdapter nor a torch.nn.Module, or the function raised
            (:func:`_call_build`: one line, the traceback in the rank's log).
    """
    builder = load_builder(path)
    if not callable(builder):
        raise ModelError(
            f"model={path} is a {type(builder).__name__}, not callable; point it at a function "
            "build(weights: str) returning a ModelAdapter or torch.nn.Module."
        )
    _check_takes_weights(builder, path)
    logger.info("model=%s: calling %s(%r) (user code)", path, path, weights)
    built = _call_build(builder, path, weights)
    if isinstance(built, ModelAdapter):
        return built
    if isinstance(built, torch.nn.Module):
        task = getattr(built, "task", None)
        if task is not None and task not in TASKS:
            raise ModelError(
                f"model={path} has task={task!r}; set it to one of {', '.join(TASKS)}."
            )
        return ModuleAdapter(
            as_cpu_float32(built, path),
            name=path,
            weights=weights,
            topk=topk,
            score_threshold=score_threshold,
            tile_size=tile_size,
            probabilities=probabilities,
        )
    raise ModelError(
        f"model={path} returned {_describe(built)}; build(weights) must return a ModelAdapter "
        "or a torch.nn.Module."
    )
