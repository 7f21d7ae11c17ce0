"""The run directory check every rank makes at start (``mgpr.outputs.rundir.prepare_run_dir``).

Ranks start together under ``srun`` and only rank 0 writes ``run.json``; the other ranks read
the directory while rank 0 may be writing it. These tests put rank 0's write at every point
between a later rank's file-system checks: that rank must never take rank 0's fresh files for a
foreign run (CI once saw ``holds results of another run (no run.json fingerprint)`` from rank 1
of a new run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mgpr.errors import OutputError
from mgpr.outputs.rundir import FINGERPRINT_FILE, prepare_run_dir, resolve_run_dir

FINGERPRINT = {"model": "reference", "inputs": ["ortho.tif"], "tile_size": 128}
FOREIGN = {"model": "fasterrcnn", "inputs": ["ortho.tif"], "tile_size": 128}
JOB = "217"


def _rank0_lands_after(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, checks: int, fingerprint: dict[str, object]
) -> None:
    """Make rank 0's ``prepare_run_dir`` run right after the ``checks``-th ``Path.exists``.

    With fewer checks than that, rank 0 runs once the later rank is done (``monkeypatch.undo``
    is then followed by :func:`_rank0_done`).
    """
    original = Path.exists
    seen = [0]

    def exists(self: Path, *args: object, **kwargs: object) -> bool:
        result = original(self, *args, **kwargs)  # type: ignore[arg-type]
        seen[0] += 1
        if seen[0] == checks:
            prepare_run_dir(run_dir, fingerprint, overwrite=False, rank=0, job_id=JOB)
        return result

    monkeypatch.setattr(Path, "exists", exists)


def _rank0_done(run_dir: Path, fingerprint: dict[str, object]) -> None:
    if not (run_dir / FINGERPRINT_FILE).exists():
        prepare_run_dir(run_dir, fingerprint, overwrite=False, rank=0, job_id=JOB)


@pytest.mark.parametrize("checks", range(1, 12))
def test_rank_reading_while_rank0_writes_run_json_accepts_the_new_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checks: int
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _rank0_lands_after(monkeypatch, run_dir, checks, FINGERPRINT)
    prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=1, job_id=JOB)
    monkeypatch.undo()
    _rank0_done(run_dir, FINGERPRINT)
    stored = json.loads((run_dir / FINGERPRINT_FILE).read_text())
    assert stored["fingerprint"] == FINGERPRINT


@pytest.mark.parametrize("checks", range(1, 12))
def test_rank_reading_a_resumed_run_while_rank0_rewrites_run_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checks: int
) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id="100")
    (run_dir / "parts").mkdir()  # an earlier job of the same run wrote tiles
    _rank0_lands_after(monkeypatch, run_dir, checks, FINGERPRINT)
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=1, job_id=JOB) is True


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_refuses_results_of_another_run(tmp_path: Path, rank: int) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, FOREIGN, overwrite=False, rank=0, job_id="100")
    (run_dir / "predictions.gpkg").write_bytes(b"results of another run")
    with pytest.raises(OutputError, match="model differs: was fasterrcnn, now reference"):
        prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=rank, job_id=JOB)
    assert (run_dir / "predictions.gpkg").read_bytes() == b"results of another run"
    assert json.loads((run_dir / FINGERPRINT_FILE).read_text())["fingerprint"] == FOREIGN


def test_a_requeue_with_another_fingerprint_is_refused_even_with_overwrite_off(
    tmp_path: Path,
) -> None:
    """Two srun steps of one job with different models must not mix their tiles."""
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, FOREIGN, overwrite=False, rank=0, job_id=JOB)
    (run_dir / "parts").mkdir()
    with pytest.raises(OutputError, match="holds results of another run"):
        prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id=JOB)
    assert (run_dir / "parts").is_dir()


def test_a_requeue_with_the_same_fingerprint_keeps_its_tiles_under_overwrite(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id=JOB)
    (run_dir / "parts").mkdir()
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=True, rank=0, job_id=JOB) is True
    assert (run_dir / "parts").is_dir()
    # another job with overwrite=true starts afresh
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=True, rank=0, job_id="999") is False
    assert not (run_dir / "parts").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_run_dir_of_an_older_mgpr_with_sqlite_shards_is_refused_untouched(
    tmp_path: Path, rank: int
) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id="100")
    (run_dir / "shards").mkdir()
    (run_dir / "shards" / "rank0.sqlite").write_bytes(b"SQLite format 3")
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="SQLite shards of an older mgpr") as err:
        prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=rank, job_id="100")
    assert "new output_dir" in str(err.value) and "overwrite=true" in str(err.value)
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    # overwrite=true starts afresh: the old shards go (never resumed, even by the same job).
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=True, rank=0, job_id="100") is False
    assert not (run_dir / "shards").exists()


def test_overwriting_a_custom_checkpoint_changes_the_fingerprint(tmp_path: Path) -> None:
    from mgpr.conf.schema import PredictConfig
    from mgpr.run.identity import fingerprint

    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"weights v1")
    cfg = PredictConfig(weights=str(ckpt))
    before = fingerprint(cfg, "my_models:build", str(ckpt), [], {})
    ckpt.write_bytes(b"weights v2")  # same path, new content
    after = fingerprint(cfg, "my_models:build", str(ckpt), [], {})
    assert before["weights"] == after["weights"]  # the path string alone would match
    assert before["weights_sha256"] != after["weights_sha256"]
    assert (
        fingerprint(PredictConfig(weights="DEFAULT"), "resnet50", "x", [], {})["weights_sha256"]
        is None
    )


def test_geoparquet_outputs_count_as_results_and_overwrite_removes_them(tmp_path: Path) -> None:
    """GeoParquet files are named after their layers, not listed by name: found by suffix."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "detections.parquet").write_bytes(b"results of a run without run.json")
    with pytest.raises(OutputError, match="no run.json fingerprint"):
        prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id=None)
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=True, rank=0, job_id=None) is False
    assert sorted(p.name for p in run_dir.iterdir()) == [FINGERPRINT_FILE]


def test_overwrite_also_removes_an_mgpr_runs_class_maps_and_previews(tmp_path: Path) -> None:
    """Left behind, the old run's segmentation/a.tif and preview_a.png passed for the new one's.

    Without a run.json the same names may be the user's own and stay.
    """
    from mgpr.monitor.previews import PREVIEW_STASH
    from mgpr.outputs.rundir import _OWN_RUN_ENTRIES
    from mgpr.tasks.segmentation import SEGMENTATION_DIR

    assert set(_OWN_RUN_ENTRIES) == {SEGMENTATION_DIR, "preview.png", PREVIEW_STASH}
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, {"model": "old"}, overwrite=False, rank=0, job_id=None)
    for name in ("segmentation/a.tif", "preview_a.png", "preview.png", ".previews/r.png"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(b"old run")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "notes.txt").write_text("the user's")
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=True, rank=0, job_id=None) is False
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([FINGERPRINT_FILE, "notes.txt"])
    foreign = tmp_path / "foreign"  # no run.json: a folder of the user's own
    (foreign / "segmentation").mkdir(parents=True)
    (foreign / "preview.png").write_bytes(b"mine")
    assert prepare_run_dir(foreign, FINGERPRINT, overwrite=True, rank=0, job_id=None) is False
    assert (foreign / "segmentation").is_dir() and (foreign / "preview.png").exists()


def test_stale_previews_go_and_stale_data_files_stay_named(tmp_path: Path) -> None:
    """What the previous summary listed and this run does not write: previews removed, data
    files kept and returned; nothing outside the run directory or unlisted is touched."""
    from mgpr.outputs.rundir import stale_outputs

    run = tmp_path / "run"
    (run / "segmentation").mkdir(parents=True)
    names = ["preview_a.png", "preview_b.png", "detections.parquet", "segmentation/b.tif"]
    for name in [*names, "mine.png", "predictions.gpkg"]:
        (run / name).write_bytes(b"x")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    listed = [str(run / n) for n in names] + [str(outside), str(run / "gone.png")]
    (run / "summary.json").write_text(json.dumps({"outputs": listed}))
    now = [str(run / "preview_a.png"), str(run / "predictions.gpkg")]
    removed, kept = stale_outputs(run, now)
    assert removed == [(run / "preview_b.png").resolve()]
    assert kept == [(run / "detections.parquet").resolve(), (run / "segmentation/b.tif").resolve()]
    assert not (run / "preview_b.png").exists() and (run / "detections.parquet").exists()
    assert (run / "mine.png").exists() and outside.exists()
    (run / "summary.json").write_text("not json")
    assert stale_outputs(run, now) == ([], [])


def test_default_run_dirs_of_commands_started_in_the_same_second_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One command per GPU from a shell loop: both chose runs/<same second>, and the second
    was refused as in use by the first. Each gets its own folder, made at once."""
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261206-120000")
    first = resolve_run_dir(None, {})
    second = resolve_run_dir(None, {})
    assert first == tmp_path / "runs" / "20261206-120000" and first.is_dir()
    assert second == tmp_path / "runs" / "20261206-120000-2" and second.is_dir()
    assert resolve_run_dir(None, {"SLURM_JOB_ID": "77"}) == tmp_path / "runs" / "slurm-77"
    assert resolve_run_dir(None, {"LSB_JOBID": "12"}) == tmp_path / "runs" / "lsf-12"
    assert resolve_run_dir("x", {"TORCHELASTIC_RUN_ID": "a"}) == tmp_path / "x"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4"}, "torchrun"),
        ({"OMPI_COMM_WORLD_SIZE": "8"}, "mpirun"),
        ({"NODE_RANK": "1", "MASTER_ADDR": "n1"}, "NODE_RANK=1"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),
    ],
)
def test_ranks_started_one_by_one_need_an_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    """Each would name its own runs/<timestamp> (another second, another node): refused."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=rf"output_dir is unset, and ranks started by .*{named}"):
        resolve_run_dir(None, env)
    assert not (tmp_path / "runs").exists()
    assert resolve_run_dir(None, {**env, "MGPR_RUN_DIR": "/r"}) == Path("/r")  # launched by rank 0


def test_fingerprints_compare_mtimes_to_the_microsecond_and_the_rest_exactly() -> None:
    from mgpr.outputs.rundir import fingerprints_equal

    a = {"inputs": [{"path": "a.tif", "bytes": 10, "mtime": 1796592513.7758853}], "tile_size": 1}
    b = {"inputs": [{"path": "a.tif", "bytes": 10, "mtime": 1796592513.7758856}], "tile_size": 1}
    assert fingerprints_equal(a, b)
    c = {"inputs": [{"path": "a.tif", "bytes": 10, "mtime": 1796592513.78}], "tile_size": 1}
    assert not fingerprints_equal(a, c)
    assert not fingerprints_equal(a, {**b, "tile_size": 2})
    assert not fingerprints_equal({"x": 1.0}, {"x": 1.0000001})  # only mtime is rounded


def test_a_killed_writers_temp_file_is_removed_by_the_next_merge(
    make_image, tmp_path: Path
) -> None:
    """A launcher killed mid-write left `.r0-...manifest.parquet.tmp` in parts/ for good; the
    merge of the resume (every rank done, the lock held) removes it and keeps every part."""
    from conftest import run_mgpr_inprocess

    img = make_image(width=256, height=256)
    run = tmp_path / "run"
    args = (f"input_path={img.path}", "model=null", "tile_size=128", "workers=0")
    assert run_mgpr_inprocess(*args, f"output_dir={run}") == 0
    parts = sorted(p.name for p in (run / "parts").iterdir())
    leftover = run / "parts" / ".r0-dead-000024.manifest.parquet.tmp"
    leftover.write_bytes(b"half a file")
    assert run_mgpr_inprocess(*args, f"output_dir={run}") == 0
    assert not leftover.exists()
    assert sorted(p.name for p in (run / "parts").iterdir()) == parts


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        ({"model": "m"}, {"model": "m", "seam": "blend"}, "seam differs: was crop, now blend"),
        ({"model": "m", "tta": "d4"}, {"model": "m"}, "tta differs: was d4, now none"),
        ({"model": "m"}, {"model": "m", "probabilities": True},
         "probabilities differs: was False, now True"),
    ],
)  # fmt: skip
def test_a_key_left_out_at_its_default_is_named_by_that_default(old, new, line) -> None:
    """run.json leaves seam/tta/... out at their defaults; a refusal said `was none`."""
    from mgpr.outputs.rundir import _first_difference

    assert _first_difference(old, new) == line


def test_a_resume_removes_the_earlier_commands_report_parts(tmp_path: Path) -> None:
    """A rank of the resume that dies before writing its part is then reported missing, not
    with the earlier command's figures; a later rank reads the directory but removes nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id=JOB)
    (run_dir / "parts").mkdir()
    (run_dir / "parts" / "r0-x-000001.manifest.parquet").write_bytes(b"a result")
    parts = run_dir / "report_parts"
    parts.mkdir()
    for rank in (0, 1):
        (parts / f"rank{rank}.json").write_text('{"status": "interrupted"}')
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=1, job_id=None)
    assert sorted(p.name for p in parts.iterdir()) == ["rank0.json", "rank1.json"]
    assert prepare_run_dir(run_dir, FINGERPRINT, overwrite=False, rank=0, job_id=None)
    assert list(parts.iterdir()) == []
    assert (run_dir / "parts" / "r0-x-000001.manifest.parquet").exists()  # results kept
