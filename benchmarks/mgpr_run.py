"""Run the real ``mgpr`` command from a benchmark and read back its run report.

Shared by the benchmark scripts (each runs as ``python benchmarks/<name>.py``, so this folder is
on ``sys.path``): they measure what a user's command does, start-up included, not a function.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def mgpr_command() -> list[str]:
    """The ``mgpr`` console script of this interpreter's environment (else ``-m mgpr.cli.main``)."""
    exe = Path(sys.executable).with_name("mgpr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mgpr.cli.main"]


def run_mgpr(
    overrides: list[str], out: Path, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], float]:
    """Run ``mgpr <overrides> output_dir=<out> progress=false`` (in ``env``, else this one's).

    Returns:
        ``(report.json as a dict, wall seconds of the whole command)``.

    Raises:
        SystemExit: the command failed; the message holds the command and its stderr tail.
    """
    cmd = [*mgpr_command(), *overrides, f"output_dir={out}", "progress=false"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text()), wall
