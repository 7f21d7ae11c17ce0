"""Which Lightning precision a run uses: ``auto`` means bf16 where the device runs it fast."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mgpr")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, accelerator: str) -> str:
    """Lightning precision string; ``auto`` = bf16 where the device runs it fast.

    Ampere and newer GPUs (compute capability >= 8) and CPUs with AVX-512 BF16/AMX get
    ``bf16-mixed``; older GPUs ``16-mixed``; other CPUs ``32-true``. The GPU asked is the
    rank's own (:func:`mgpr.run.accel.rank_device_index`): this runs before Lightning sets
    the device, and asking ``cuda:0`` from every rank would touch GPU 0 from ranks of other
    GPUs.
    """
    if requested == "16-mixed" and accelerator == "cpu":
        # Lightning runs bf16-mixed instead (fp16 autocast is GPU-only) and says so in a
        # warning; the summary and run report must name what ran, not what was asked.
        log.warning(
            "precision=16-mixed: fp16 autocast runs on GPUs only; this CPU run uses bf16-mixed "
            "(set precision=bf16-mixed or precision=32 to choose)"
        )
        return "bf16-mixed"
    if requested != "auto":
        return "32-true" if requested == "32" else requested
    if accelerator == "gpu":
        import torch

        from mgpr.run.accel import rank_device_index

        major, _ = torch.cuda.get_device_capability(rank_device_index())
        return "bf16-mixed" if major >= 8 else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
