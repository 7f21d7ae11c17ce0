"""The ``profiler`` config key, translated into what ``Trainer(profiler=...)`` accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mgpr.conf.load import PROFILERS
from mgpr.errors import ConfigError


def make_profiler(name: str | None, run_dir: Path, node: int | None = None) -> Any:
    """Translate the ``profiler`` config key into what ``Trainer(profiler=...)`` accepts.

    Args:
        name: None / ``""`` / ``"none"`` (no profiler), ``"simple"`` (per-hook wall times),
            ``"advanced"`` (cProfile per hook) or ``"pytorch"`` (torch.profiler, CPU and CUDA ops,
            Chrome traces written to ``run_dir``).
        run_dir: run directory; the profilers write their files there.
        node: this node's index on a run of several nodes, None on one: Lightning suffixes
            the files with the LOCAL rank only, so two nodes' rank 0 shared one file name.

    Returns:
        None, or a Lightning profiler writing ``predict-<name>-profile.txt`` into ``run_dir``
        (``...-profile-<local rank>.txt`` with several ranks, ``...-profile-node<N>-<local
        rank>.txt`` with several nodes).

    Why files: given only the name, Lightning's simple and advanced profilers print their
    report through its logger at teardown, which mgpr's logging leaves out of the console,
    so ``profiler=simple`` produced nothing at all.

    Raises:
        ConfigError: any other value.
    """
    key = "none" if name is None else str(name).strip().lower()
    if key in ("", "none", "null"):
        return None
    filename = f"{key}-profile" + (f"-node{node}" if node is not None else "")
    if key == "simple":
        from lightning.pytorch.profilers import SimpleProfiler

        return SimpleProfiler(dirpath=run_dir, filename=filename)
    if key == "advanced":
        from lightning.pytorch.profilers import AdvancedProfiler

        return AdvancedProfiler(dirpath=run_dir, filename=filename)
    if key == "pytorch":
        from lightning.pytorch.profilers import PyTorchProfiler

        return PyTorchProfiler(dirpath=run_dir, filename=filename)
    raise ConfigError(f"profiler={name!r} is not known; use one of: none, {', '.join(PROFILERS)}")
