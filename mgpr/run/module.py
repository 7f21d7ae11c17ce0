"""The LightningModule that runs a model adapter over batches of raw tiles.

Per batch (``predict_step``): tiles flagged empty or failed by the dataset skip the model; the
rest are scaled ON THE DEVICE (:class:`~mgpr.data.scaling.ValueScaler`: carrier dtype ->
float32 in [0, 1] by ``value_range``), their invalid pixels (``batch["mask"]``: nodata, mask,
alpha, NaN) are filled with 0 (:mod:`mgpr.data.masking`), then they go through
``adapter.prepare`` (the model's own normalisation), the network under
Lightning's ``inference_mode`` and precision plugin (autocast; with ``tta=`` once per view,
the views' class probabilities averaged: :mod:`mgpr.models.tta`), and ``adapter.postprocess`` into
plain per-tile records in TILE pixel coordinates (detections centred on an invalid pixel are
dropped: :mod:`mgpr.tasks.nodata`), each wrapped in a
:class:`~mgpr.tasks.base.TileOutcome` whatever the task (the record is the task's business). They
are returned to the :class:`~mgpr.run.writer_callback.PredictionPartWriter` callback, which
publishes them in the rank's part files; nothing is kept
(``trainer.predict(..., return_predictions=False)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from mgpr.data.clipping import ClipTally
from mgpr.data.dataset import STATUS_FAILED, STATUS_OK
from mgpr.data.masking import FILL_VALUE, fill_invalid
from mgpr.data.scaling import ValueScaler
from mgpr.geo.tiling import Tile
from mgpr.models.base import Detections, ModelAdapter, check_class_maps, nonfinite_tiles
from mgpr.models.compile import CompileOutcome, compile_adapter, pad_batch
from mgpr.models.registry import max_detections_for
from mgpr.models.tta import VIEWS, augmented_forward, fuse_detections, view_inputs
from mgpr.run.accel import CompilePlan, InFlightCopies, configure_cuda
from mgpr.tasks.base import TileOutcome
from mgpr.tasks.nodata import drop_masked

log = logging.getLogger("mgpr")


class InferenceModule(pl.LightningModule):
    """Wraps a :class:`ModelAdapter` for ``Trainer.predict``.

    Args:
        adapter: the model adapter; its ``module`` becomes a submodule, so Lightning moves it to
            the rank's device.
        tiles: this rank's tiles; ``batch["index"]`` indexes this list. None for fake data.
        tile_size: pixels.
        on_stage: optional callback ``(stage_name, seconds)`` for the run report.
        compile_plan: compile the network in ``on_predict_start`` (once per rank); None = eager.
        batch_size: tiles per batch; a compiled network gets every batch padded to it.
        scaler: raw tiles -> model input on the device; None = uint8 tiles in [0, 255] (fake
            data), or raw values for an adapter with ``input_range = "raw"``.
        max_detections: the ``max_detections`` key when set: each tile keeps its best-scoring
            boxes, after those on nodata are dropped, whatever the adapter (a user's model
            included; the built-in detectors already keep no more). None: as the adapter returns.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        tiles: Sequence[Tile] | None,
        tile_size: int,
        on_stage: Callable[[str, float], None] | None = None,
        compile_plan: CompilePlan | None = None,
        batch_size: int | None = None,
        scaler: ValueScaler | None = None,
        max_detections: int | None = None,
        tta: str = "none",
        nms_iou: float = 0.5,
        tta_fusion: str = "nms",
    ) -> None:
        super().__init__()
        #: detection with ``tta=``: ``nms`` or ``wbf`` (:func:`mgpr.models.tta.fuse_detections`)
        self.tta_fusion = tta_fusion
        #: detection with ``tta=``: IoU above which the views' boxes of one class merge
        self.nms_iou = nms_iou
        #: test-time augmentation views (``tta=``); one view (the tile itself) runs plainly
        self.views = VIEWS[tta]
        self.max_detections = max_detections
        self.scaler = scaler or ValueScaler(raw=adapter.input_range == "raw")
        self.tiles = list(tiles) if tiles is not None else None
        #: valid values the scaler's clamp moved (below lo / above hi); None for raw values
        self.clip_tally = None if self.scaler.raw else ClipTally()
        self.adapter = adapter
        self.net = adapter.module
        self.tile_size = tile_size
        self.on_stage = on_stage
        self.compile_plan = compile_plan
        self.batch_size = batch_size
        self.compile_outcome: CompileOutcome | None = None
        self._copies = InFlightCopies()
        #: a tile's model output held NaN (recorded as failed): warned once per rank
        self._nonfinite_warned = False
        # A rank with no tile left (few tiles, or all done before a resume) returns at once.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def on_predict_start(self) -> None:
        """Eval mode, cuDNN autotuning on CUDA, and the compile plan (the module is on its device).

        The adapter chose its memory format when built.
        """
        self.net.eval()
        configure_cuda(self.device)
        plan = self.compile_plan
        if plan is not None and plan.enabled and self.compile_outcome is None:
            self.compile_outcome = compile_adapter(
                self.adapter, requested=plan.requested, mode=plan.mode, reason=plan.reason
            )
        elif plan is not None and self.compile_outcome is None:
            self.compile_outcome = CompileOutcome(plan.requested, "eager", None, plan.reason)

    def on_predict_end(self) -> None:
        """Unpin and unmap the batch pool's buffers once the last copy is done.

        Lightning stops after ``len(loader)`` batches without asking the loader for another,
        so the pool's own end-of-iteration release never runs under it: done here instead.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._copies.clear()
        loaders = self.trainer.predict_dataloaders
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            pool = getattr(loader, "batch_pool", None)
            if pool is not None:
                pool.forget_mappings()

    def transfer_batch_to_device(
        self, batch: dict[str, Any], device: torch.device, dataloader_idx: int
    ) -> dict[str, Any]:
        """Move only the images and masks (non-blocking); ids and statuses stay.

        Reading ``status``/``index`` back from a GPU would force a device sync on every batch.
        The mask goes to ``device_mask`` (the input's fill); ``mask`` stays the host copy (the
        detections' drop reads it on the CPU, no read-back). On CUDA the host batch is held until
        its copy is done: a registered pool buffer is copied by DMA after this returns, and the
        pool must not hand it to a worker before.
        """
        out = dict(batch)
        mask = batch.get("mask")
        if device.type != "cpu":
            out["image"] = batch["image"].to(device, non_blocking=True)
            if mask is not None:
                out["device_mask"] = mask.to(device, non_blocking=True)
            if device.type == "cuda":
                self._copies.hold((batch["image"], mask))
        return out

    def _compiled(self) -> bool:
        return self.compile_outcome is not None and self.compile_outcome.used == "compiled"

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[TileOutcome] | int:
        """Predict one batch: one :class:`TileOutcome` per tile (a tile count for fake data)."""
        images: torch.Tensor = batch["image"]
        mask = batch.get("mask")  # (B, H, W) uint8 host validity, or None: every pixel valid
        # numpy arrays from TileDataset's batched read, tensors from default_collate
        status = np.asarray(batch["status"])
        ok = np.flatnonzero(status == STATUS_OK)
        results: list[Any] = []
        nonfinite: np.ndarray | None = None
        if len(ok):
            keep = None if len(ok) == len(status) else torch.as_tensor(ok, device=images.device)
            paths = None
            if self.tiles is not None and self.scaler.needs_paths:
                positions = np.asarray(batch["index"])[ok]
                paths = [self.tiles[i].id.path for i in positions.tolist()]
            valid = batch.get("device_mask", mask)
            counter = self._clip_counter(valid, keep, batch, ok)
            x = self.scaler(images, paths, keep, counter)  # the counter fills and peaks first
            if counter is None or not counter.clamped:  # else its fill came before the clamp
                x = fill_invalid(x, valid, keep)
            if self.batch_size and self._compiled():
                x = pad_batch(x, self.batch_size)  # one static shape: no recompile
            inputs = self.adapter.prepare(x)
            if len(self.views) > 1 and self.adapter.task == "detection":
                results, flags = self._detect_in_views(inputs, len(ok))
                start = time.perf_counter()
            else:
                if len(self.views) > 1:
                    raw = augmented_forward(self.adapter, inputs, self.views)
                else:
                    raw = self.adapter.forward(inputs)
                start = time.perf_counter()
                flags = nonfinite_tiles(raw, len(ok))  # on the device; read after postprocess
                results = list(self.adapter.postprocess(raw, self.tile_size))[: len(ok)]
            nonfinite = flags.cpu().numpy() if flags is not None else None
            if self.adapter.task == "segmentation" and self.adapter.categories:
                n = len(self.adapter.categories)
                check_class_maps(results, n, self.tile_size, self.adapter.name)
            if mask is not None:
                results = drop_masked(results, np.asarray(mask), ok.tolist())
            if self.max_detections is not None:
                cap = self.max_detections
                results = [r.best(cap) if isinstance(r, Detections) else r for r in results]
            if self.on_stage is not None:
                self.on_stage("postprocess", time.perf_counter() - start)
        if self.tiles is None:
            return len(status)
        indexes = np.asarray(batch["index"])
        reasons = batch["reason"]
        by_position = dict(zip(ok.tolist(), results, strict=True))
        broken: set[int] = set()
        if nonfinite is not None and nonfinite.any():
            broken = {int(ok[i]) for i in np.flatnonzero(nonfinite)}
            self._warn_nonfinite(len(broken))
        outcomes: list[TileOutcome] = []
        for pos, (idx, st) in enumerate(zip(indexes.tolist(), status.tolist(), strict=True)):
            tile = self.tiles[idx]
            res = by_position.get(pos)
            if pos in broken:
                outcomes.append(TileOutcome(tile, STATUS_FAILED, self._nonfinite_reason()))
            elif res is not None:
                outcomes.append(TileOutcome(tile, st, "", res))
            else:
                outcomes.append(TileOutcome(tile, st, reasons[pos]))
        return outcomes

    def _clip_counter(
        self,
        valid: torch.Tensor | None,
        keep: torch.Tensor | None,
        batch: dict[str, Any],
        ok: np.ndarray,
    ) -> _ClipCounter | None:
        """The clip tally's hooks for one batch (None for raw values): see :class:`_ClipCounter`."""
        if self.clip_tally is None:
            return None
        counted = None if valid is None else (valid if keep is None else valid[keep])
        if self.tiles is None:
            return _ClipCounter(self.clip_tally, counted, None, [], [])
        kept = [self.tiles[i] for i in np.asarray(batch["index"])[ok].tolist()]
        runs: list[tuple[str, int, int]] = []
        for k, tile in enumerate(kept):
            if runs and runs[-1][0] == tile.id.path:
                runs[-1] = (tile.id.path, runs[-1][1], k + 1)
            else:
                runs.append((tile.id.path, k, k + 1))
        rows = [t.valid_height for t in kept]
        cols = [t.valid_width for t in kept]
        return _ClipCounter(self.clip_tally, counted, runs, rows, cols)

    def _detect_in_views(self, inputs: Any, n: int) -> tuple[list[Detections], torch.Tensor | None]:
        """``tta=`` for a detector: each view's boxes, back in the tile's frame, fused by NMS.

        Returns the ``n`` tiles' fused detections and their NaN flags (any view's).
        """
        per_view: list[list[Detections]] = []
        flags: torch.Tensor | None = None
        for view in self.views:
            raw = self.adapter.forward(view_inputs(inputs, view))
            found = nonfinite_tiles(raw, n)
            if found is not None:
                flags = found if flags is None else flags | found
            per_view.append(list(self.adapter.postprocess(raw, self.tile_size))[:n])  # type: ignore[arg-type]
        cap = max_detections_for(self.adapter.name, self.max_detections)
        fused = fuse_detections(
            per_view,
            self.views,
            self.tile_size,
            self.nms_iou,
            cap,
            self.tta_fusion,
            min_score=float(getattr(self.adapter, "score_threshold", 0.0)),
        )
        return fused, flags

    def _nonfinite_reason(self) -> str:
        """Why a tile whose model output held NaN failed, and how to retry it."""
        precision = getattr(getattr(self, "trainer", None), "precision", None)
        return (
            f"the model's output holds NaN (precision {precision or 'unknown'}); "
            "re-run with precision=32 to retry only the failed tiles"
        )

    def _warn_nonfinite(self, count: int) -> None:
        """One warning per rank, at its first batch with NaN outputs (all are in failed_tiles)."""
        if not self._nonfinite_warned:
            self._nonfinite_warned = True
            log.warning(
                "model=%s returned NaN for %d tile(s) of a batch: they are recorded as "
                "failed (failed_tiles.csv), not as results; precision=32 usually avoids it",
                self.adapter.name,
                count,
            )


class _ClipCounter:
    """One batch's hooks into the clip tally: the scaler's ``before_clamp``.

    Before the clamp it counts what the clamp will move, sets the invalid pixels to
    :data:`~mgpr.data.masking.FILL_VALUE` (so nodata cannot pass for a peak; the clamp keeps
    0 at 0) and takes each raster's peak: above 1 where values clip at ``hi`` (after the
    clamp it could never exceed 1).

    Counted: the validity mask's pixels (nodata, mask band) and, for edge tiles, only the window
    inside the raster (their zero padding is no data: a range with ``lo > 0`` would count it as
    clipped, 28 % of a 700 x 600 raster's values in 256 px tiles); per raster, over the batch's
    runs of consecutive tiles of one raster. Nothing is built until the scaler clamps (uint8 by
    [0, 255] never does): then no peak is taken either.
    """

    def __init__(
        self,
        tally: ClipTally,
        valid: torch.Tensor | None,
        runs: list[tuple[str, int, int]] | None,
        rows: list[int],
        cols: list[int],
    ) -> None:
        self.tally, self.valid, self.runs = tally, valid, runs
        self.rows, self.cols = rows, cols
        self.clamped = False

    def __call__(self, x: torch.Tensor) -> None:
        """Count the values the clamp is about to move (``x`` scaled, not yet clamped)."""
        self.clamped = True
        pixels = self.valid
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if self.rows and (min(self.rows) < height or min(self.cols) < width):  # edge tiles
            inside = (
                torch.arange(height, device=x.device)[None, :, None]
                < torch.tensor(self.rows, device=x.device)[:, None, None]
            ) & (
                torch.arange(width, device=x.device)[None, None, :]
                < torch.tensor(self.cols, device=x.device)[:, None, None]
            )
            pixels = inside if pixels is None else inside & pixels.ne(0)
        self.tally.add(x, pixels, self.runs)
        if self.valid is not None:  # the K kept tiles' validity: fill_invalid's, in place
            x.masked_fill_(self.valid.eq(0).unsqueeze(1), FILL_VALUE)
        self.tally.add_peaks(x, self.runs)
