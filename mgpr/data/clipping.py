"""How many of the values a rank fed its model ``value_range`` clipped: the run's honesty check.

:class:`~mgpr.data.scaling.ValueScaler` maps each valid value to ``(raw - lo) / span`` and clamps
to [0, 1]. A value below ``lo`` becomes 0 and one above ``hi`` becomes 1, losing what
distinguished it: a few percent is a stretch doing its job (``value_range=auto`` clips 2 % at
each end by construction), most of a raster is a range meant for other data (a 12-bit range
given to 16-bit imagery, reflectance 0..1 given a range in counts), which the model then sees
as one flat value. The other way round, a range far wider than the data (a 16-bit [0, 65535]
over 12-bit imagery, reflectance 0..1 given a range in counts) clips nothing but crushes every
value into the bottom of the model's input: the model sees a nearly black raster. So
:class:`ClipTally` counts both ends over the VALID values (every band of every pixel the
validity mask keeps: nodata and padding are not data) and keeps each raster's PEAK, its
brightest valid value as a share of [lo, hi], and its FLOOR, the darkest (a range whose ``lo``
lies far below the data crushes every value near 1; one far off on both sides leaves the data a
narrow band anywhere in between), on the device, without a host sync per batch;
the rank reads them once, at the end of predict, into its report part (``values_clipped``),
and rank 0 sums them into ``summary.json`` ``values.clipped``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: Share of valid values clipped at one end above which rank 0 warns (and the summary says so).
CLIPPED_WARN_SHARE = 0.25
#: An input whose brightest valid value is below this share of [lo, hi] is warned of as crushed
#: (12-bit data under [0, 65535] peaks at 0.0625).
PEAK_WARN_SHARE = 0.1
#: An input whose valid values span less than this share of [lo, hi] (peak - floor) is warned
#: of as crushed: the model sees them as one flat grey (reflectance 0.2..0.3 under [-1, 1]).
SPAN_WARN_SHARE = 0.1


class ClipTally:
    """Running counts of valid values below 0 / above 1 after scaling, per input, on the device.

    Counts are kept per raster (one row each, added as its first tile is counted), so one raster
    of a folder read with a range meant for the others shows; without raster names (fake data,
    tests) everything goes to one unnamed row.
    """

    def __init__(self) -> None:
        self.inputs: list[str | None] = []  # the raster of each row
        self._row_of: dict[str | None, int] = {}
        self._counts: torch.Tensor | None = None  # (rows, 3) int64: below, above, values
        self._peaks: torch.Tensor | None = None  # (rows,) float32: brightest valid value
        self._floors: torch.Tensor | None = None  # (rows,) float32: darkest valid value

    def _row(self, path: str | None, device: torch.device) -> int:
        """The counts row of ``path``, a new one at its first tile.

        Capacity doubles: a folder of 10,000 chips reallocates 11 times, not 10,000.
        """
        row = self._row_of.get(path)
        if row is None:
            row = self._row_of[path] = len(self.inputs)
            self.inputs.append(path)
            if self._counts is None or row >= self._counts.shape[0]:  # the three grow together
                size = max(8, 2 * row)
                grown = torch.zeros((size, 3), dtype=torch.int64, device=device)
                peaks = torch.full((size,), -math.inf, dtype=torch.float32, device=device)
                floors = torch.full((size,), math.inf, dtype=torch.float32, device=device)
                if self._counts is not None:
                    assert self._peaks is not None and self._floors is not None
                    grown[:row], peaks[:row], floors[:row] = self._counts, self._peaks, self._floors
                self._counts, self._peaks, self._floors = grown, peaks, floors
        return row

    def add(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None,
        runs: Sequence[tuple[str, int, int]] | None = None,
    ) -> None:
        """Count one batch and take each run's floor, before the clamp.

        Args:
            x: (K, C, H, W) float32, scaled (0 = ``lo``, 1 = ``hi``), not yet clamped.
            valid: (K, H, W) validity (0 = invalid) on ``x``'s device, or None: all valid.
            runs: ``(raster path, start, stop)`` of the consecutive tiles of one raster (a
                batch holds a raster's tiles in order, so usually one run); None: one
                unnamed run of all K.
        """
        if x.numel() == 0:
            return
        # count_nonzero, not bool.sum(): ~9x faster on CPU (sum widens every bool to int64);
        # over each run's whole slice, not per tile (count_nonzero over dims is ~6x slower)
        below, above = x.lt(0.0), x.gt(1.0)
        keep = None if valid is None else valid.ne(0).unsqueeze(1)  # every band of a pixel
        if keep is not None:
            below.logical_and_(keep)
            above.logical_and_(keep)
        for path, start, stop in runs or [(None, 0, x.shape[0])]:
            row = self._row(path, x.device)
            if keep is None:  # a fill on the device, not a copy from the host
                values = torch.full((), (stop - start) * x[0].numel(), device=x.device)
            else:
                values = torch.count_nonzero(keep[start:stop]) * x.shape[1]
            counts = torch.stack(
                [
                    torch.count_nonzero(below[start:stop]),
                    torch.count_nonzero(above[start:stop]),
                    values.to(torch.int64),
                ]
            )
            assert self._counts is not None and self._floors is not None
            self._counts[row].add_(counts)
            # the darkest valid value: invalid pixels (nodata, padding) must not pass for it;
            # the bands' min first, then the mask on one plane (5x faster on CPU than a masked
            # copy of every band)
            if keep is None:
                floor = x[start:stop].amin().float()
            else:
                darkest = x[start:stop].amin(dim=1)
                darkest.masked_fill_(keep[start:stop, 0].logical_not(), math.inf)
                floor = darkest.amin().float()
            torch.minimum(self._floors[row], floor, out=self._floors[row])

    def add_peaks(self, x: torch.Tensor, runs: Sequence[tuple[str, int, int]] | None) -> None:
        """Each run's brightest value, from the model's input as it goes in.

        Args:
            x: (K, C, H, W) the batch scaled but BEFORE the clamp to [0, 1] (a peak above 1:
                values clipped at ``hi``), its invalid pixels already set to 0 (the module's
                clip counter fills them in place, as :func:`mgpr.data.masking.fill_invalid`
                would after the clamp), so nodata cannot pass for the raster's peak; one max
                per run.
            runs: as for :meth:`add`, which came first.
        """
        if x.numel() == 0 or self._peaks is None:
            return
        for path, start, stop in runs or [(None, 0, x.shape[0])]:
            row = self._row(path, x.device)
            peak = x[start:stop].amax().float()
            torch.maximum(self._peaks[row], peak, out=self._peaks[row])

    def totals(self) -> dict[str, Any] | None:
        """The counts: ``{below, above, values, peak, floor, inputs}``.

        ``inputs``: ``{path: [below, above, values, peak, floor]}`` of the named rasters
        counted. One device-to-host read. None when nothing was counted: no batch, or only
        uint8 tiles by [0, 255], which the scaler maps without a clamp (no value can fall
        outside).
        """
        if self._counts is None:
            return None
        assert self._peaks is not None and self._floors is not None
        used = self._counts[: len(self.inputs)].cpu().tolist()
        peaks = self._peaks[: len(self.inputs)].cpu().tolist()
        floors = self._floors[: len(self.inputs)].cpu().tolist()
        rows: list[list[Any]] = [
            [int(b), int(a), int(v), _finite(p), _finite(f)]
            for (b, a, v), p, f in zip(used, peaks, floors, strict=True)
        ]
        below, above, values = (sum(row[i] for row in rows) for i in range(3))
        per_input = {p: row for p, row in zip(self.inputs, rows, strict=True) if p is not None}
        peak = max((row[3] for row in rows if row[3] is not None), default=None)
        floor = min((row[4] for row in rows if row[4] is not None), default=None)
        return {
            "below": below,
            "above": above,
            "values": values,
            "peak": peak,
            "floor": floor,
            "inputs": per_input,
        }


def _finite(value: float) -> float | None:
    """A share rounded for the record; None where no valid value was seen (+-inf)."""
    return round(float(value), 6) if math.isfinite(value) else None


def clipped_shares(totals: dict[str, Any]) -> dict[str, float | int | None]:
    """``summary.json`` ``values.clipped``: the counts as shares of the valid values (0..1).

    ``peak`` / ``floor``: the brightest / darkest valid value as a share of [lo, hi] (above 1
    / below 0: clipped), None where the counts came without one (parts of an older mgpr).
    """
    values = int(totals.get("values") or 0)
    below, above = int(totals.get("below") or 0), int(totals.get("above") or 0)
    peak, floor = totals.get("peak"), totals.get("floor")
    return {
        "below": round(below / values, 6) if values else 0.0,
        "above": round(above / values, 6) if values else 0.0,
        "values": values,
        "peak": None if peak is None else round(float(peak), 6),
        "floor": None if floor is None else round(float(floor), 6),
    }
