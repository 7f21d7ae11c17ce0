"""The memory a rank may use: the node's, or a cgroup's limit below it (sbatch --mem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpr.data.batch_pool import batch_beyond_memory
from mgpr.monitor.memory_limit import MemoryLimit, cgroup_memory_limit, memory_limit
from mgpr.monitor.report import _rank_row
from tests.conftest import run_mgpr_inprocess

GIB = 2**30


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        # v2, SLURM's cgroup/v2 plugin: the job's limit, the step and task below it unlimited
        (
            "0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0",
            {
                "system.slice/slurmstepd.scope/job_42/memory.max": str(16 * GIB),
                "system.slice/slurmstepd.scope/job_42/step_0/memory.max": "max",
                "system.slice/slurmstepd.scope/job_42/step_0/user/task_0/memory.max": "max",
            },
            16 * GIB,
        ),
        # v2: the tightest level wins, wherever it is
        (
            "0::/a/b",
            {"a/memory.max": str(8 * GIB), "a/b/memory.max": str(12 * GIB)},
            8 * GIB,
        ),
        # v2 in a container: its cgroup is the mount's root, the host path is not there
        ("0::/docker/abc", {"memory.max": str(4 * GIB)}, 4 * GIB),
        # v2, no limit anywhere
        ("0::/user.slice", {"user.slice/memory.max": "max"}, None),
        # v1, SLURM's task/cgroup: limit_in_bytes on the job, v1's "unlimited" elsewhere
        (
            "4:memory:/slurm/uid_0/job_7/step_0/task_0\n3:cpuset:/",
            {
                "memory/slurm/uid_0/job_7/memory.limit_in_bytes": str(6 * GIB),
                "memory/slurm/uid_0/job_7/step_0/memory.limit_in_bytes": "9223372036854771712",
                "memory/memory.limit_in_bytes": "9223372036854771712",
            },
            6 * GIB,
        ),
        # hybrid (v1 memory + v2 at unified/ without the memory controller): v1 unlimited
        (
            "4:memory:/process_api/x\n0::/",
            {
                "memory/process_api/x/memory.limit_in_bytes": "9223372036854771712",
                "unified/cgroup.controllers": "",
            },
            None,
        ),
    ],
)
def test_cgroup_memory_limit_in_both_versions(
    tmp_path: Path, membership: str, files: dict[str, str], expected: int | None
) -> None:
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(membership + "\n")
    root = tmp_path / "sys_fs_cgroup"
    _tree(root, files)
    assert cgroup_memory_limit(proc, root) == expected


def test_no_cgroup_file_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path) is None


def test_the_smaller_of_the_node_and_the_cgroup_bounds_a_rank() -> None:
    assert memory_limit(512 * GIB, 16 * GIB) == MemoryLimit(16 * GIB, "cgroup")
    assert memory_limit(24 * GIB, 64 * GIB) == MemoryLimit(24 * GIB, "node")  # limit above
    assert memory_limit(24 * GIB, None) == MemoryLimit(24 * GIB, "node")
    assert memory_limit(None, 2 * GIB) == MemoryLimit(2 * GIB, "cgroup")
    assert memory_limit(None, None) is None


def test_a_batch_beyond_the_jobs_memory_limit_is_refused_naming_the_limit(
    make_image, tmp_path: Path, monkeypatch, capsys
) -> None:
    line = batch_beyond_memory(16, 4, 9000, 2, 8 * GIB, (9000, 9000), memory_source="cgroup")
    assert line is not None and line.endswith(
        "more than the 8.0 GiB this job may use (its cgroup memory limit: sbatch --mem or the "
        "container's); lower tile_size (the largest input is 9000 x 9000 px) or batch_size"
    )
    img = make_image("small.tif", width=300, height=200)
    monkeypatch.setattr("mgpr.monitor.part.host_memory_total", lambda: 512 * GIB)
    monkeypatch.setattr("mgpr.monitor.part.cgroup_memory_limit", lambda: 4 * 2**20)  # 4 MiB
    run = tmp_path / "run"
    args = (f"input_path={img.path}", "model=reference", "workers=0", f"output_dir={run}")
    assert run_mgpr_inprocess(*args, "tile_size=512", "batch_size=8") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "more than the 4.0 MiB this job may use (its cgroup memory limit" in err
    assert not (run / "parts").exists()


def test_a_cpu_ranks_memory_share_is_of_its_limit(tmp_path: Path) -> None:
    part = {
        "global_rank": 0,
        "device": "cpu",
        "host_memory_total_bytes": 512 * GIB,
        "stats": {"rss_bytes_avg": 2 * GIB, "rss_bytes_peak": 4 * GIB},
    }
    row = _rank_row({**part, "host_memory_limit_bytes": 16 * GIB})
    assert row["memory_kind"] == "host_rss" and row["mem_total_gib"] == 16.0
    assert row["mem_peak_pct"] == 25.0
    row = _rank_row({**part, "host_memory_limit_bytes": None})
    assert row["mem_total_gib"] == 512.0 and row["mem_peak_pct"] == pytest.approx(0.8)
