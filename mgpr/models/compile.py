"""``torch.compile`` for inference, with one way back to eager and fixed batch shapes.

Why a wrapper: ``torch.compile`` is lazy, so a model that cannot be compiled (an unsupported
op, no C++ compiler for CPU inductor, a Triton failure on the GPU) fails at its FIRST CALL, in
the middle of ``predict``, not where ``torch.compile`` was called. :class:`GuardedCompile`
catches that failure once, logs one line, and runs eager from then on; the run's
:class:`CompileOutcome` says what was used (``summary.json`` ``compile``).

Why padding: the network is compiled with ``dynamic=False`` (tiles are fixed-size, so every
full batch has the same shape and static kernels are the fastest). The last batch of a rank, or
a batch with empty/failed tiles taken out, is shorter; a new shape would compile the network a
second time (tens of seconds, for one batch). :func:`pad_batch` fills such a batch up to the
batch size with zero tiles whose results the caller drops.

This module imports no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mgpr.models.base import ModelAdapter

log = logging.getLogger(__name__)

#: What ``torch.compile`` is called as; tests inject a failing one.
Compiler = Callable[..., Callable[..., Any]]


@dataclass(slots=True)
class CompileOutcome:
    """What a rank ran: recorded in ``summary.json`` (``compile``) and ``report.json``.

    Attributes:
        requested: the ``compile`` key: ``"auto"``, ``"true"`` or ``"false"``.
        used: ``"compiled"`` or ``"eager"``.
        mode: the ``torch.compile`` mode (None = inductor's default), None when eager.
        reason: why (the ``auto`` rule's figures, or the one-line compile error of a fallback).
    """

    requested: str
    used: str
    mode: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class GuardedCompile:
    """Call the compiled network; on its first failure fall back to the eager one for good.

    An out-of-memory error is not a compile failure: it propagates (the run's OOM message
    names the fix), as does any error the eager network raises too.

    Args:
        eager: the module itself.
        compiled: what ``torch.compile(eager, ...)`` returned (compiles on its first call).
        outcome: updated in place when the fallback happens.
    """

    def __init__(
        self, eager: Callable[..., Any], compiled: Callable[..., Any], outcome: CompileOutcome
    ) -> None:
        self.eager = eager
        self.compiled: Callable[..., Any] | None = compiled
        self.outcome = outcome

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run compiled while it works, else eager."""
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # dynamo/inductor/Triton raise many unrelated types
                self.fall_back(exc)
        return self.eager(*args, **kwargs)

    def fall_back(self, exc: BaseException) -> None:
        """Use eager from now on; one warning line and the reason in the outcome."""
        self.compiled = None
        self.outcome.used = "eager"
        self.outcome.mode = None
        self.outcome.reason = f"torch.compile failed, running eager: {_first_line(exc)}"
        log.warning("compile=%s: %s", self.outcome.requested, self.outcome.reason)


def compile_adapter(
    adapter: ModelAdapter,
    *,
    requested: str,
    mode: str | None,
    reason: str,
    compiler: Compiler | None = None,
) -> CompileOutcome:
    """Make ``adapter.forward`` call a compiled network (its :meth:`ModelAdapter.compile` part).

    Called once per rank, after the module is on its device. Detectors compile their backbone
    only (their own ``compile`` override).

    Args:
        adapter: the model adapter; changed in place.
        requested: the ``compile`` key, for the record.
        mode: ``torch.compile`` mode, e.g. ``"max-autotune-no-cudagraphs"``; None = default.
        reason: why compiling (recorded).
        compiler: ``torch.compile`` unless injected (tests).

    Returns:
        The outcome, ``used="compiled"`` until a first call fails (then ``"eager"``).
    """
    compile_fn: Compiler = compiler or torch.compile
    outcome = CompileOutcome(requested=requested, used="compiled", mode=mode, reason=reason)

    def wrap(module: torch.nn.Module) -> Callable[..., Any]:
        kwargs: dict[str, Any] = {"dynamic": False}
        if mode is not None:
            kwargs["mode"] = mode
        guarded = GuardedCompile(module, module, outcome)
        try:
            guarded.compiled = compile_fn(module, **kwargs)
        except Exception as exc:  # e.g. an unsupported Python version for dynamo
            guarded.fall_back(exc)
        return guarded

    adapter.compile(wrap)
    return outcome


def pad_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``images`` followed by zero tiles up to ``batch_size`` (same dtype, device, layout).

    Args:
        images: (B, C, H, W) tiles on the device, ``B <= batch_size``.
        batch_size: the compiled batch dimension.

    Returns:
        (batch_size, C, H, W); rows ``B:`` are zeros whose results the caller discards.
        ``images`` itself when it is already full.
    """
    missing = batch_size - int(images.shape[0])
    if missing <= 0:
        return images
    filler = images.new_zeros((missing, *images.shape[1:]))
    return torch.cat([images, filler], dim=0)
