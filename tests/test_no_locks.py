"""No file lock on the run directory's per-rank files: a short run under strace (#13)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import mgpr_cmd, subprocess_env

#: strace -y prints ``fcntl(5</path/of/fd>, F_SETLK, ...)`` and ``flock(5</path>, LOCK_EX)``.
_LOCK = re.compile(r"\b(flock|fcntl)\((\d+)<([^>]*)>(?:, (F_[A-Z0-9_]+))?")
_SET_LOCK = ("F_SETLK", "F_SETLKW", "F_SETLK64", "F_SETLKW64", "F_OFD_SETLK", "F_OFD_SETLKW")


def _strace_works(tmp: Path) -> bool:
    exe = shutil.which("strace")
    if exe is None:
        return False
    probe = subprocess.run(
        [exe, "-f", "-o", str(tmp / "probe.txt"), "true"], capture_output=True, timeout=60
    )
    return probe.returncode == 0  # ptrace may be forbidden in a container


def test_a_run_takes_no_lock_on_its_part_files(make_image, tmp_path: Path) -> None:
    if not _strace_works(tmp_path):
        pytest.skip("strace is missing or cannot trace here (apt-get install -y strace)")
    img = make_image(width=512, height=512, objects=4)
    run = tmp_path / "run"
    trace = tmp_path / "trace.txt"
    env = subprocess_env()
    cmd = [
        "strace",
        "-f",
        "-y",
        "-e",
        "trace=flock,fcntl",
        "-o",
        str(trace),
        *mgpr_cmd(
            f"input_path={img.path}",
            "model=reference",
            "tile_size=128",
            "batch_size=2",
            "workers=1",
            f"output_dir={run}",
            "progress=false",
        ),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run / "parts").glob("*.manifest.parquet")), "the run published no part"
    locks = []
    for line in trace.read_text(errors="replace").splitlines():
        for call, _fd, path, op in _LOCK.findall(line):
            if call == "flock" or op in _SET_LOCK:
                locks.append((call, op, path))
    # The parse works: the GeoPackage, SQLite inside, is locked, but only where it is built,
    # in a private folder of the node-local temporary directory.
    assert any("mgpr-gpkg-" in path for _, _, path in locks), locks[:5]
    parts = str(run / "parts")
    on_parts = [lk for lk in locks if lk[2].startswith(parts)]
    assert on_parts == [], on_parts[:5]
    # Nothing else under the run directory is locked during the run either.
    in_run = [lk for lk in locks if lk[2].startswith(str(run) + os.sep)]
    assert in_run == [], in_run[:5]
