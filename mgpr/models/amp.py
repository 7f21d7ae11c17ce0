"""Mixed precision without inexact coordinates: the caller's autocast state, read once.

Lightning's precision plugin runs every ``predict_step`` under ``torch.autocast``. That is what
makes a backbone fast, but anything computed in bf16 has 8 significant bits: a box edge between
512 and 1024 px lands on a 4 px step. Detection adapters therefore read the autocast state the
caller set (:func:`autocast_state`), run the backbone under it, and run everything that produces
coordinates (anchors, box decoding, NMS, the map back to tile pixels) with autocast off, in
float32 (:func:`fp32`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of the autocast region the caller runs in, for ``device_type``.

    Args:
        device_type: ``"cuda"``, ``"cpu"``, ... (``tensor.device.type``).

    Returns:
        Whether autocast is on for that device type and the dtype it casts to (bf16/fp16;
        torch's default for the device type when it is off).
    """
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def fp32(device_type: str) -> AbstractContextManager[object]:
    """A region with autocast off on ``device_type``: float32 inputs stay float32 throughout."""
    return torch.autocast(device_type, enabled=False)
