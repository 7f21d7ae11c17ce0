"""Raw tiles on the device -> the model's float32 input: the one place values are scaled.

A batch reaches the device in its carrier dtype (:func:`mgpr.geo.values.carrier_dtype`: uint8,
uint16, int16, int32, int64 or float32, the raster's values exactly). :class:`ValueScaler` turns
it into float32 in [0, 1] with each raster's :class:`~mgpr.geo.values.ValueRange`, per band::

    unit = clamp((raw - raw_lo) / raw_span, 0, 1)      # raw_lo, raw_span fold GDAL scale/offset

as in-place ops on one float32 tensor (``x.float().sub_(lo).mul_(1/span).clamp_(0, 1)``; NaN and
infinities of float rasters become 0 / 1 first). For uint8 tiles with the default [0, 255] it
is ``x.float().div_(255)``, the exact op every adapter ran before this module existed, so uint8
results are unchanged to the bit. Adapters then only apply their own normalisation (ImageNet
mean/std, ...); one that sets ``input_range = "raw"`` gets ``x.float()``: native values, unscaled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mgpr.geo.values import ValueRange

#: Torch's "barebones" unsigned dtypes: few kernels (copy/convert, not indexing or arithmetic on
#: every backend), so they are converted to float32 before anything else.
_BAREBONES = (torch.uint16, torch.uint32, torch.uint64)


def to_float32(images: torch.Tensor) -> torch.Tensor:
    """``images`` as a NEW float32 tensor (never a view of the batch: callers scale it in place).

    A uint16/uint32 tensor whose device has no direct conversion kernel is widened through the
    signed dtype of the same width (a bit-for-bit reinterpretation, then a mask of the sign
    extension), so it converts on any backend.
    """
    if images.dtype == torch.float32:
        return images.clone()
    if images.dtype in _BAREBONES:
        try:
            return images.to(torch.float32)
        except (RuntimeError, NotImplementedError):
            return _widen_unsigned(images).to(torch.float32)
    return images.to(torch.float32)


def _widen_unsigned(images: torch.Tensor) -> torch.Tensor:
    """uint16 -> int32 or uint32 -> int64 through a same-width signed view (exact)."""
    if images.dtype == torch.uint16:
        return images.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    if images.dtype == torch.uint32:
        return images.view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
    raise TypeError(f"cannot widen {images.dtype}")


class ValueScaler:
    """Scales a batch of raw tiles to the model's input on the batch's device.

    Args:
        ranges: each raster's :class:`ValueRange` by path; None = every tile is uint8 in
            [0, 255] (fake data, tests).
        raw: the adapter asked for raw values (``input_range = "raw"``): float32, unscaled.

    The per-raster lo / 1/span tensors are built once per device and cached; a batch from several
    rasters with different ranges gathers them into (B, C, 1, 1).
    """

    def __init__(self, ranges: dict[str, ValueRange] | None = None, raw: bool = False) -> None:
        self.ranges = dict(ranges or {})
        self.raw = raw
        distinct = {(r.raw_lo, r.raw_span) for r in self.ranges.values()}
        self._uniform = (
            next(iter(self.ranges.values())) if len(distinct) == 1 else None
        )  # every raster alike: one (1, C, 1, 1) pair for every batch
        self._default_uint8 = not self.ranges or (
            self._uniform is not None
            and all(v == 0.0 for v in self._uniform.raw_lo)
            and all(v == 255.0 for v in self._uniform.raw_span)
        )
        self._cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def needs_paths(self) -> bool:
        """True when rasters differ in range, so each call needs the path of every tile."""
        return not self.raw and bool(self.ranges) and self._uniform is None

    def __call__(
        self,
        images: torch.Tensor,
        paths: Sequence[str] | None = None,
        keep: torch.Tensor | None = None,
        before_clamp: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) raw tiles -> (K, C, H, W) float32 model input, same device.

        Args:
            images: the batch in its carrier dtype, on the device the model runs on.
            paths: the raster of each of the K kept tiles (None: every raster alike).
            keep: int64 positions of the K tiles to keep (None: all B); indexed before the
                conversion where the dtype allows it (less work), after it for uint16/uint32.
            before_clamp: called with the scaled (K, C, H, W) values before they are clamped to
                [0, 1] (a run counts what the clamp moves: :mod:`mgpr.data.clipping`); not
                called for uint8 by [0, 255], which cannot leave the range.
        """
        if keep is not None and images.dtype not in _BAREBONES:
            images = images[keep]
            keep = None
        if self.raw:
            x = to_float32(images)
            return x if keep is None else x[keep]
        if images.dtype == torch.uint8 and self._default_uint8:
            return images.to(torch.float32).div_(255.0)  # the cheapest exact map of [0, 255]
        x = to_float32(images)
        if keep is not None:
            x = x[keep]
        lo, inv_span = self._lo_inv_span(x.device, paths, x.shape[0])
        x.sub_(lo).mul_(inv_span)
        if images.dtype.is_floating_point:
            x.nan_to_num_(nan=0.0, posinf=1.0, neginf=0.0)
        if before_clamp is not None:
            before_clamp(x)
        return x.clamp_(0.0, 1.0)

    def _lo_inv_span(
        self, device: torch.device, paths: Sequence[str] | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._uniform is not None:
            return self._tensors(next(iter(self.ranges)), device)
        if not self.ranges:  # every tile uint8 in [0, 255], here in a wider carrier
            zero = torch.zeros((1, 1, 1, 1), device=device)
            return zero, torch.full((1, 1, 1, 1), 1.0 / 255.0, device=device)
        if paths is None or len(paths) != batch:
            raise ValueError("rasters with different value ranges need the path of every tile")
        pairs = [self._tensors(p, device) for p in paths]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _tensors(self, path: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get((path, device))
        if cached is None:
            vr = self.ranges[path]
            lo = torch.tensor(vr.raw_lo, dtype=torch.float64).view(1, -1, 1, 1)
            inv = (1.0 / torch.tensor(vr.raw_span, dtype=torch.float64)).view(1, -1, 1, 1)
            cached = (lo.float().to(device), inv.float().to(device))
            self._cache[(path, device)] = cached
        return cached

    def describe(self) -> dict[str, list[list[float]]]:
        """Per raster path, ``[[lo, hi], ...]`` per band in physical units (for the summary)."""
        return {path: vr.pairs() for path, vr in self.ranges.items()}
