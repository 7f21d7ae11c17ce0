"""The run directory: where it is, what run it belongs to, and refusing to mix runs.

Every rank must agree on the directory without talking to each other (under ``srun`` they start
together; under Lightning's own launcher rank 0 starts the others), so it is derived, in order,
from ``output_dir=``, from ``MGPR_RUN_DIR`` (set by rank 0 for the processes it launches), from
``SLURM_JOB_ID`` (``runs/slurm-<id>``: a requeued job keeps its id, hence its directory, and
resumes), and only then from a timestamp.

``run.json`` holds the run's fingerprint (model, weights and their content hash, tiling, bands,
inputs with size and mtime). A new run in a directory with another fingerprint is refused unless
``overwrite=true``; the same fingerprint resumes, and nothing else does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mgpr.errors import OutputError

log = logging.getLogger(__name__)

RUN_DIR_ENV = "MGPR_RUN_DIR"
FINGERPRINT_FILE = "run.json"
#: Per-rank SQLite shards of mgpr before parts; a run directory holding them is refused.
LEGACY_SHARDS = "shards"
_RESULT_ENTRIES = (
    "parts",
    "merge",
    LEGACY_SHARDS,
    "missing_tiles.txt",
    "report_parts",
    "predictions.gpkg",
    "summary.json",
    "report.json",
    "report.png",
    "failed_tiles.csv",
    "config.yaml",
    FINGERPRINT_FILE,
)


#: Entries removed with the rest on ``overwrite=true`` when ``run.json`` proves the directory
#: is an mgpr run's (see :func:`_result_paths`); ``preview_<stem>.png`` files are globbed.
_OWN_RUN_ENTRIES = ("segmentation", "preview.png", ".previews")


def rerun(run_dir: str | os.PathLike[str] | None, to: str = "resume") -> str:
    """``re-run the same command with output_dir=<run_dir> to resume``: the advice of a stop.

    The run directory is named because the same command alone may pick another one: without
    ``output_dir=`` a run gets ``runs/<time stamp>`` or ``runs/slurm-<job id>`` (jobs/job.slurm
    sets it so), and a resubmitted job has a new id, so it would start from zero.
    """
    if run_dir is None:
        return f"re-run the same command to {to}"
    import shlex

    return f"re-run the same command with output_dir={shlex.quote(str(run_dir))} to {to}"


def resolve_run_dir(output_dir: str | None, env: Mapping[str, str]) -> Path:
    """The run directory, identical on every rank of one job (see the module docstring)."""
    if output_dir:
        return Path(output_dir).absolute()
    if env.get(RUN_DIR_ENV):
        return Path(env[RUN_DIR_ENV])
    job = env.get("SLURM_JOB_ID")
    if job:
        return Path("runs", f"slurm-{job}").absolute()
    if env.get("LSB_JOBID"):  # LSF: every rank of the job sees the same id, as under SLURM
        return Path("runs", f"lsf-{env['LSB_JOBID']}").absolute()
    launcher = _independent_launcher(env)
    if launcher:
        raise OutputError(
            f"output_dir is unset, and ranks started by {launcher} would each name their own "
            "runs/<timestamp> folder (one per node or per second); set output_dir= to one "
            "folder every rank sees, e.g. output_dir=/shared/runs/ortho1"
        )
    return _new_timestamp_dir(Path("runs").absolute())


def _independent_launcher(env: Mapping[str, str]) -> str | None:
    """What started this process as one of several that do not share ``MGPR_RUN_DIR``."""
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"):
        if (env.get(name) or "1").strip() not in ("", "0", "1"):
            return {"OMPI_COMM_WORLD_SIZE": "mpirun", "PMI_SIZE": "an MPI launcher"}.get(
                name, f"a launcher (WORLD_SIZE={env[name]})"
            )
    if env.get("NODE_RANK"):
        return f"hand on several nodes (NODE_RANK={env['NODE_RANK']})"
    return None


def _new_timestamp_dir(parent: Path) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>``, made here; ``-2``, ``-3`` ... when that name is taken.

    Why made at once: two commands started in the same second (one per GPU from a shell loop)
    chose the same folder, and the second was refused as in use by the first. ``mkdir``
    without ``exist_ok`` is atomic, so each command gets its own. Only the first process of a
    run gets here: the ranks it launches inherit ``MGPR_RUN_DIR``.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:  # not writable, a file in the way: check_writable says it in one line
            return path
        return path
    raise OutputError(f"no free run directory name under {parent} for {stamp}; set output_dir=")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync it, then ``os.replace`` it into place.

    The temp name carries the process and thread id, so concurrent writers never share one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(run_dir: Path) -> None:
    """Create the run directory and prove it is writable, or raise OutputError."""
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.is_file()), None)
    if blocker is not None:
        what = "is a file" if blocker == run_dir else f"cannot be made: {str(blocker)!r} is a file"
        raise OutputError(
            f"output_dir={str(run_dir)!r} {what}, not a folder; choose another output_dir (a run "
            "directory is a folder mgpr creates)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output_dir={str(run_dir)!r} is not writable ({exc.strerror or exc}); "
            "choose another output_dir"
        ) from None


def prepare_run_dir(
    run_dir: Path, fingerprint: dict[str, Any], overwrite: bool, rank: int, job_id: str | None
) -> bool:
    """Check the run directory against this run's fingerprint; returns True when resuming.

    Rank 0 writes ``run.json`` (and, with ``overwrite=true``, first removes the previous run's
    results); other ranks only read. Only the fingerprint decides a resume: a SLURM requeue of
    the same job (same ``SLURM_JOB_ID`` in ``run.json``) with the same fingerprint resumes even
    with ``overwrite=true``, so a preempted job never throws away its own finished tiles; the
    same job with another fingerprint is refused like any other run.

    A directory holding an older mgpr's ``shards/rank*.sqlite`` is refused (its tiles cannot be
    resumed) unless ``overwrite=true``, which removes them.

    Raises:
        OutputError: the directory holds results of a different run (or of an older mgpr) and
            overwrite is false.
    """
    legacy = sorted((run_dir / LEGACY_SHARDS).glob("rank*.sqlite"))
    if legacy and not overwrite:
        raise OutputError(
            f"output_dir={str(run_dir)!r} holds per-rank SQLite shards of an older mgpr "
            f"({legacy[0].relative_to(run_dir)}), which this version cannot resume; choose a new "
            "output_dir, or pass overwrite=true to start afresh"
        )
    path = run_dir / FINGERPRINT_FILE
    # Results first, fingerprint second: ranks start together and rank 0 may write run.json
    # (itself a result entry) at any moment. Read the other way round, a rank could find no
    # run.json, then rank 0's fresh one among the results, and refuse its own run. In this
    # order, results seen imply run.json was already there (or the directory is foreign).
    has_results = any(p.exists() for p in _result_paths(run_dir))
    previous: dict[str, Any] | None = None
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    same = previous is not None and fingerprints_equal(previous.get("fingerprint"), fingerprint)
    # The same SLURM job (a requeue) never throws its own tiles away, even with overwrite=true;
    # but it resumes only with the same fingerprint: two srun steps of one job with another
    # model or tiling must not mix their tiles.
    own_requeue = (
        same and bool(job_id) and previous is not None and previous.get("slurm_job_id") == job_id
    )
    if has_results and not same and not overwrite:
        differs = _first_difference(previous.get("fingerprint") if previous else None, fingerprint)
        differs += _cwd_hint(previous or {}, differs)
        raise OutputError(
            f"output_dir={str(run_dir)!r} holds results of another run ({differs}); "
            "pass overwrite=true to start afresh, or choose another output_dir"
        )
    resume = has_results and not legacy and ((same and not overwrite) or own_requeue)
    if rank == 0:
        if has_results and not resume:
            for target in _result_paths(run_dir, previous is not None):
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            log.info("overwrite=true: removed the previous run's results in %s", run_dir)
        elif resume:
            _remove_earlier_report_parts(run_dir)
        write_json_atomic(
            path,
            {
                "fingerprint": fingerprint,
                "slurm_job_id": job_id,
                "written_at": time.time(),
                "cwd": os.getcwd(),  # where its relative input paths are relative to
            },
        )
    return resume


def _remove_earlier_report_parts(run_dir: Path) -> None:
    """A resume's report must not read an earlier command's rank figures as its own.

    Each rank rewrites its part as it stops; one that dies first (OOM, lost node) leaves its
    slot empty, and the report then lists it as missing instead of showing the earlier run's
    figures. Rank 0 removes them here, before any rank of this command can write one.
    """
    for part in (run_dir / "report_parts").glob("rank*.json"):
        try:
            part.unlink()
        except OSError as exc:
            log.warning("cannot remove the earlier run's report part %s: %s", part, exc)


def earlier_input_paths(run_dir: Path) -> list[str]:
    """The input paths, as given, of the run whose ``run.json`` is in ``run_dir`` (or none)."""
    try:
        return _input_names(json.loads((run_dir / FINGERPRINT_FILE).read_text()))
    except (OSError, ValueError):
        return []


def _input_names(record: Any) -> list[str]:
    """The input paths, as given, in a ``run.json`` record (none where it has no such list)."""
    fingerprint = record.get("fingerprint") if isinstance(record, dict) else None
    inputs = fingerprint.get("inputs") if isinstance(fingerprint, dict) else None
    if not isinstance(inputs, list):
        return []
    return [str(i["path"]) for i in inputs if isinstance(i, dict) and "path" in i]


def _cwd_hint(previous: Mapping[str, Any], differs: str) -> str:
    """For inputs that differ, where the earlier run's relative paths were relative to.

    Its relative paths name other files (or none) from another working directory; the
    refusal then says where to run from instead of only that the inputs differ.
    """
    cwd = previous.get("cwd")
    if not isinstance(cwd, str) or not differs.startswith("inputs") or cwd == os.getcwd():
        return ""
    relative = [p for p in _input_names(previous) if not p.startswith("/")]
    if not relative:
        return ""
    return f"; that run named its inputs ({relative[0]!r}, ...) relative to {cwd}: run from there"


def stale_outputs(run_dir: Path, outputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """Files the previous summary.json of ``run_dir`` lists and ``outputs`` does not.

    A resume may write other files than the run before it: ``output_format=gpkg`` after
    ``parquet``, ``previews=auto`` after ``all``, ``vectorize=false`` after ``true``. Stale
    previews (quicklooks mgpr drew, showing the earlier results) are removed; stale data files
    are kept (they are results a user may have opened, and were the same features unless the
    resume retried failed tiles) and returned, so the caller can name them. Only files the
    earlier summary named (``outputs``, and ``stale_outputs``: a stale file is named on every
    run until it is gone), inside ``run_dir``, are considered: a user's own file is never one.

    Returns:
        ``(removed, kept)``: the previews removed and the data files left in place.
    """
    try:
        before = json.loads((run_dir / "summary.json").read_text())
        earlier = [*(before.get("outputs") or []), *(before.get("stale_outputs") or [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return [], []
    current = {Path(p).resolve() for p in outputs}
    root = run_dir.resolve()
    removed: list[Path] = []
    kept: list[Path] = []
    for name in earlier:
        path = Path(str(name)).resolve()
        if path in current or not path.is_relative_to(root) or not path.is_file():
            continue
        if path.parent == root and path.name.startswith("preview") and path.suffix == ".png":
            path.unlink(missing_ok=True)
            removed.append(path)
        else:
            kept.append(path)
    return removed, kept


def _result_paths(run_dir: Path, ours: bool = False) -> list[Path]:
    """Every entry a run leaves in its directory (GeoParquet files are named after layers).

    ``ours``: the directory holds a ``run.json``, so it is an mgpr run directory: its class
    maps (``segmentation/``) and previews (``preview*.png``, the ``.previews`` stash) are the
    previous run's too and go with them on ``overwrite=true`` (left behind, a class map or a
    preview of an input the new run does not have looked like the new run's). Without a
    ``run.json`` those names may be a user's own and are neither counted nor removed.
    """
    paths = [run_dir / name for name in _RESULT_ENTRIES] + sorted(run_dir.glob("*.parquet"))
    if ours:
        paths += [run_dir / name for name in _OWN_RUN_ENTRIES]
        paths += sorted(run_dir.glob("preview_*.png"))
    return paths


#: Seconds within which two recorded modification times are the same: a float's rounding of
#: the file system's nanoseconds (``touch -d @<recorded mtime>`` gives back the recorded value).
MTIME_TOLERANCE_S = 1e-6


def fingerprints_equal(old: Any, new: Any, key: str = "") -> bool:
    """Equal fingerprints, ``mtime`` values within :data:`MTIME_TOLERANCE_S` of each other."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(fingerprints_equal(old[k], new[k], k) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(
            fingerprints_equal(a, b, key) for a, b in zip(old, new, strict=True)
        )
    if key == "mtime" and isinstance(old, float) and isinstance(new, float):
        return abs(old - new) <= MTIME_TOLERANCE_S
    return bool(old == new)


def _mtime_only(old: dict[str, Any], new: dict[str, Any], where: str) -> str | None:
    """For a file record whose only change is its modification time, the line and the fix.

    A copy without ``cp -p`` (restaging data to scratch, a re-download) keeps the bytes and
    changes the time; the refusal then says how to give the time back, as mgpr cannot tell a
    copy from an edit of the same size.
    """
    if not ({"path", "mtime"} <= old.keys() and old.keys() == new.keys()):
        return None
    rest_equal = all(fingerprints_equal(old[k], new[k], k) for k in old if k != "mtime")
    if (
        not rest_equal
        or not isinstance(old["mtime"], float)
        or fingerprints_equal(old["mtime"], new["mtime"], "mtime")
    ):
        return None
    import shlex

    from mgpr.geo.archives import local_archive

    path = str(new["path"])
    path = local_archive(path) or path  # a zip member's time is its archive's
    return (
        f"{where}.mtime differs: {path!r} has the same size but another modification time than "
        f"in that run; if it is the same file copied again (cp without -p), give it back its "
        f"time with `touch -d @{old['mtime']!r} {shlex.quote(path)}` and re-run to resume"
    )


#: What a fingerprint key absent from run.json means: the value it is left out at (see
#: :func:`mgpr.run.identity.fingerprint`), so a refusal says ``seam differs: was crop, now
#: blend`` (it said ``was none``).
ABSENT_MEANS: dict[str, Any] = {
    "seam": "crop",
    "tta": "none",
    "tta_fusion": "nms",
    "probabilities": False,
    "normalisation": "the model's own",
}


def _first_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if not old:
        return "no run.json fingerprint"
    found = _diff(old, new, "")
    return found or "fingerprint differs"


def _diff(old: Any, new: Any, where: str) -> str | None:
    """The first place two fingerprints differ, down to the leaf (``inputs[1].bands``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        touched = _mtime_only(old, new, where)
        if touched:
            return touched
        for key in list(new) + [k for k in old if k not in new]:
            # a top-level key left out at its default (run.json as before the key existed)
            unset = ABSENT_MEANS.get(key) if not where else None
            a = old[key] if key in old else unset
            b = new[key] if key in new else unset
            found = _diff(a, b, f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if where == "aoi" and old != new:  # content hashes: say what they mean
        if old is None:
            return "this run has aoi=, the run in it had none"
        if new is None:
            return "the run in it had an aoi=, this one has none"
        return "aoi= is another area of interest than the run's"
    paths = _path_change(old, new, where)
    if paths:
        return paths
    # Lists of records (inputs) are followed into; lists of values (bands, ranges) are leaves.
    records = (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and any(isinstance(v, dict) for v in [*old, *new])
    )
    if records:
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            named = isinstance(a, dict) and isinstance(b, dict) and a.get("path") == b.get("path")
            label = f" ({a['path']!r})" if named and "path" in a else ""
            found = _diff(a, b, f"{where}[{i}]{label}")
            if found:
                return found
        return None
    if old != new:
        return f"{where} differs: was {_shown(old)}, now {_shown(new)}"
    return None


def _shown(value: Any) -> str:
    """A fingerprint leaf in a refusal: ``none`` for None (unset, or a file that was missing)."""
    return "none" if value is None else str(value)[:80]


def _path_change(old: Any, new: Any, where: str) -> str | None:
    """For lists of input records, the rasters one run has and the other lacks, by path.

    Two input lists that differ in their files would otherwise be quoted as two truncated
    dumps with the same first 80 characters.
    """

    def paths(value: Any) -> list[str] | None:
        if not isinstance(value, list) or not value:
            return None
        if not all(isinstance(v, dict) and "path" in v for v in value):
            return None
        return [str(v["path"]) for v in value]

    was, now = paths(old), paths(new)
    if was is None or now is None or set(was) == set(now):
        return None
    parts = []
    gone = [p for p in was if p not in set(now)]
    added = [p for p in now if p not in set(was)]
    for label, names in (("no longer listed", gone), ("new", added)):
        if names:
            shown = ", ".join(repr(n) for n in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} {label}: {shown}{more}")
    return f"{where} differ: {len(was)} raster(s) before, {len(now)} now ({'; '.join(parts)})"
