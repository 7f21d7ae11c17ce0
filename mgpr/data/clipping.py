"""How many of the values a rank fed its model ``value_range`` clipped: the run's honesty check.

:class:`~mgpr.data.scaling.ValueScaler` maps each valid value to ``(raw - lo) / span`` and clamps
to [0, 1]. A value below ``lo`` becomes 0 and one above ``hi`` becomes 1, losing what
distinguished it: a few percent is a stretch doing its job (``value_range=auto`` clips 2 % at
each end by construction), most of a raster is a range meant for other data (a 12-bit range
given to 16-bit imagery, reflectance 0..1 given a range in counts), which the model then sees
as one flat value. :class:`ClipTally` counts both ends over the VALID values (every band of
every pixel the validity mask keeps: nodata fill values are not data), on the device, without
a host sync per batch; the rank reads the counts once, at the end of predict, into its report
part (``values_clipped``), and rank 0 sums them into ``summary.json`` ``values.clipped``.
"""

from __future__ import annotations

import torch

#: Share of valid values clipped at one end above which rank 0 warns (and the summary says so).
CLIPPED_WARN_SHARE = 0.25


class ClipTally:
    """Running counts of valid values below 0 / above 1 after scaling, on their device."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # int64 [below, above, valid values]

    def add(self, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Count one batch, before the clamp.

        Args:
            x: (K, C, H, W) float32, scaled (0 = ``lo``, 1 = ``hi``), not yet clamped.
            valid: (K, H, W) validity (0 = invalid) on ``x``'s device, or None: all valid.
        """
        if x.numel() == 0:
            return
        # count_nonzero, not bool.sum(): ~9x faster on CPU (sum widens every bool to int64)
        below, above = x.lt(0.0), x.gt(1.0)
        if valid is None:
            values = torch.tensor(x.numel(), device=x.device, dtype=torch.int64)
        else:
            keep = valid.ne(0).unsqueeze(1)  # (K, 1, H, W): every band of a valid pixel
            below.logical_and_(keep)
            above.logical_and_(keep)
            values = torch.count_nonzero(keep) * x.shape[1]
        counts = torch.stack([torch.count_nonzero(below), torch.count_nonzero(above), values])
        self._counts = counts if self._counts is None else self._counts.add_(counts)

    def totals(self) -> dict[str, int] | None:
        """``{"below": n, "above": n, "values": n}`` so far (one device-to-host read).

        None when nothing was counted: no batch, or only uint8 tiles by [0, 255], which the
        scaler maps without a clamp (no value can fall outside).
        """
        if self._counts is None:
            return None
        below, above, values = (int(v) for v in self._counts.cpu().tolist())
        return {"below": below, "above": above, "values": values}


def clipped_shares(totals: dict[str, int]) -> dict[str, float | int]:
    """``summary.json`` ``values.clipped``: the counts as shares of the valid values (0..1)."""
    values = int(totals.get("values") or 0)
    below, above = int(totals.get("below") or 0), int(totals.get("above") or 0)
    return {
        "below": round(below / values, 6) if values else 0.0,
        "above": round(above / values, 6) if values else 0.0,
        "values": values,
    }
