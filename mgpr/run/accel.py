"""Accelerator settings of a rank: compile or not, cuDNN autotuning, the rank's own GPU.

Each choice is a pure function of the run's figures so that the rules are tested on CPU; the
two calls that touch CUDA (:func:`configure_cuda`, :class:`InFlightCopies`' default events)
run only on GPU ranks.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: ``compile=auto`` compiles on a GPU when every rank has at least this many batches planned.
#: Why 5000: compiling takes about a minute per rank (ResNet-50 on CPU: 1.5 min on 2 shared
#: cores; on GPUs not measured yet, see ``benchmarks/gpu_checks.sh``) and is assumed to buy
#: 1.2-1.5x, so it is repaid after 3-5 min of eager compute. 5000 batches of 16 tiles at 1024 px
#: (84 Gpx per rank) is about that for ResNet-50 in bf16 on an H100-class GPU (~450 tiles/s
#: estimated) and half an hour or more for Faster R-CNN; a shorter run is left eager.
AUTO_COMPILE_MIN_BATCHES = 5000

#: ``torch.compile`` mode, on GPUs and CPUs: inductor's default (None). The convolutions, nearly
#: all of a CNN's time, run in cuDNN/oneDNN either way (``cudnn.benchmark`` picks their
#: algorithm); what compiling gains for inference is fusing the batch-norm/ReLU/add chains
#: between them, which the default mode does. ``max-autotune-no-cudagraphs`` additionally
#: benchmarks Triton conv/GEMM templates for minutes per rank for a few per cent on CNNs, and
#: CUDA graphs (``reduce-overhead``) remove launch overhead, which at 512-1024 px tiles is well
#: under 1 % of a batch, at the price of a static memory pool per shape and outputs that the next
#: replay overwrites (Lightning holds a batch ahead; the detectors' heads read the backbone's
#: outputs).
COMPILE_MODE: str | None = None


@dataclass(frozen=True, slots=True)
class CompilePlan:
    """Whether a rank compiles its network, with which mode, and why (recorded in summary).

    Attributes:
        requested: the ``compile`` key (``auto`` | ``true`` | ``false``).
        enabled: compile (True) or stay eager.
        mode: ``torch.compile`` mode; None = inductor's default (CPU).
        reason: the rule and the figures it saw, one line.
    """

    requested: str
    enabled: bool
    mode: str | None
    reason: str


def resolve_compile(
    requested: str, accelerator: str, planned_tiles: int, world_size: int, batch_size: int
) -> CompilePlan:
    """Apply the ``compile`` key.

    ``true`` compiles (mode :data:`COMPILE_MODE`), ``false`` never. ``auto`` never compiles on
    CPU (a minute or more of C++ code generation that a CPU run's gain does not repay: see the
    README's CPU figures), and on GPUs only when
    ``ceil(planned_tiles / world_size / batch_size) >= AUTO_COMPILE_MIN_BATCHES``.

    Args:
        requested: ``auto`` | ``true`` | ``false`` (already validated).
        accelerator: ``gpu`` or ``cpu``.
        planned_tiles: tiles of the whole plan (all ranks; the fake-data count).
        world_size: ranks of the run.
        batch_size: tiles per batch.
    """
    mode = COMPILE_MODE
    if requested == "false":
        return CompilePlan(requested, False, None, "compile=false")
    if requested == "true":
        return CompilePlan(requested, True, mode, "compile=true")
    batches = math.ceil(planned_tiles / max(1, world_size) / max(1, batch_size))
    if accelerator != "gpu":
        return CompilePlan(requested, False, None, "compile=auto: never on CPU")
    if batches >= AUTO_COMPILE_MIN_BATCHES:
        return CompilePlan(
            requested,
            True,
            mode,
            f"compile=auto: {batches} batches per rank >= {AUTO_COMPILE_MIN_BATCHES}",
        )
    return CompilePlan(
        requested,
        False,
        None,
        f"compile=auto: {batches} batches per rank < {AUTO_COMPILE_MIN_BATCHES}, "
        "too short to repay compiling",
    )


def local_device_index(env: Mapping[str, str], device_count: int) -> int:
    """The CUDA ordinal this rank will use, known before Lightning sets the device.

    Lightning puts local rank ``i`` on ``cuda:i`` (``LOCAL_RANK`` from its launcher or torchrun,
    ``SLURM_LOCALID`` in an srun step); a task that sees fewer GPUs than its local rank (one GPU
    per task, ``--gpu-bind``) uses its only one. Asking another ordinal anything would put a
    CUDA context on a GPU that belongs to another rank.
    """
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in env and (key != "SLURM_LOCALID" or "SLURM_STEP_ID" in env):
            local = int(env[key])
            return local if local < device_count else 0
    return 0


def rank_device_index() -> int:
    """:func:`local_device_index` for this process (imports torch; call on GPU runs only)."""
    import torch

    return local_device_index(os.environ, torch.cuda.device_count())


def configure_cuda(device: Any) -> bool:
    """Turn cuDNN autotuning on for a CUDA rank; returns whether it was set.

    Tiles are fixed-size (edge tiles padded, batches padded when compiled), so the convolution
    algorithm cuDNN benchmarks for the first batch's shape serves every later batch.
    """
    if getattr(device, "type", None) != "cuda":
        return False
    import torch

    torch.backends.cudnn.benchmark = True
    return True


class InFlightCopies:
    """Host batches whose non-blocking copy to the GPU may still be running.

    A pool buffer registered as pinned memory (:mod:`mgpr.data.pinned`) is copied by DMA after
    ``tensor.to(device, non_blocking=True)`` returns; the pool frees the buffer for the next
    batch as soon as no tensor refers to it. Holding the host tensor here until an event
    recorded after the copy has completed keeps the worker from overwriting it mid-copy.

    Args:
        make_event: returns an object with ``record()`` and ``query() -> bool``
            (``torch.cuda.Event``; tests pass a fake).
    """

    def __init__(self, make_event: Callable[[], Any] | None = None) -> None:
        self._make_event = make_event
        self._held: deque[tuple[Any, Any]] = deque()

    def hold(self, host: Any) -> None:
        """Keep ``host`` until the copy just queued on the current stream is done."""
        if self._make_event is None:
            import torch

            self._make_event = torch.cuda.Event
        event = self._make_event()
        event.record()
        self._held.append((event, host))
        self.prune()

    def prune(self) -> int:
        """Drop the batches whose copies are done, oldest first; returns how many remain."""
        while self._held and self._held[0][0].query():
            self._held.popleft()
        return len(self._held)

    def clear(self) -> None:
        """Forget every batch (after the last one: the caller has synchronised)."""
        self._held.clear()
