"""The ``profiler`` config key, translated into what ``Trainer(profiler=...)`` accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mgpr.conf.load import PROFILERS
from mgpr.errors import ConfigError


def make_profiler(name: str | None, run_dir: Path) -> Any:
    """Translate the ``profiler`` config key into what ``Trainer(profiler=...)`` accepts.

    Args:
        name: None / ``""`` / ``"none"`` (no profiler), ``"simple"`` (per-hook wall times),
            ``"advanced"`` (cProfile per hook) or ``"pytorch"`` (torch.profiler, CPU and CUDA ops,
            Chrome traces written to ``run_dir``).
        run_dir: run directory; the PyTorch profiler writes its files there.

    Returns:
        None, or a Lightning profiler writing ``predict-<name>-profile.txt`` into ``run_dir``
        (one file per rank beyond the first: ``...-profile-<rank>.txt``).

    Why files: given only the name, Lightning's simple and advanced profilers print their
    report through its logger at teardown, which mgpr's logging leaves out of the console,
    so ``profiler=simple`` produced nothing at all.

    Raises:
        ConfigError: any other value.
    """
    key = "none" if name is None else str(name).strip().lower()
    if key in ("", "none", "null"):
        return None
    if key == "simple":
        from lightning.pytorch.profilers import SimpleProfiler

        return SimpleProfiler(dirpath=run_dir, filename="simple-profile")
    if key == "advanced":
        from lightning.pytorch.profilers import AdvancedProfiler

        return AdvancedProfiler(dirpath=run_dir, filename="advanced-profile")
    if key == "pytorch":
        from lightning.pytorch.profilers import PyTorchProfiler

        return PyTorchProfiler(dirpath=run_dir, filename="pytorch-profile")
    raise ConfigError(f"profiler={name!r} is not known; use one of: none, {', '.join(PROFILERS)}")
