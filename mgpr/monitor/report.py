"""Run report: merge every rank's part into ``report.json``, ``report.png`` and a text summary.

Runs on rank 0 once every rank has finished. Imports no Lightning; the hint's rules are in
:mod:`mgpr.monitor.hint`, the picture in :mod:`mgpr.monitor.plot`.

``run_dir/report.json`` (schema ``mgpr.monitor.report/1``). GiB = 2**30 bytes; a share is a fraction
0-1 of the rank's wall time; null = not measured (no NVML, MIG, CPU run):

===============================  ========  ==================================================
key                              type      meaning (unit)
===============================  ========  ==================================================
schema                           str       ``"mgpr.monitor.report/1"``
created_unix_s                   float     when the report was built (s since epoch)
world_size                       int       ranks the job started
ranks_reported                   list[int] ranks whose part was read
missing_ranks                    list[int] ranks without a part (killed, OOM, node lost)
failed_ranks                     list[int] ranks whose part says ``status: failed``
interrupted_ranks                list[int] ranks stopped by a signal (``status: interrupted``:
                                           preemption, scancel, Ctrl-C); their figures up to
                                           the stop are in ``ranks``
unreadable_parts                 list[str] part files that exist but could not be parsed
context                          obj       as passed by the caller: workers, batch_size,
                                           precision, cpus_per_task, ...
ranks[]                          list      one row per reported rank (= per GPU), by rank:
  global_rank, local_rank,       int
  node_rank
  hostname                       str       node name
  device                         str       ``"cuda:0"`` (local ordinal) or ``"cpu"``
  status                         str       ``"finished"`` / ``"failed"`` / ``"interrupted"``
  error                          str|null  exception of a failed or interrupted rank
  gpu_name, gpu_uuid             str|null  NVML (or torch) name and uuid
  physical_index                 int|null  NVML index of the physical GPU (null without NVML)
  memory_kind                    str       what mem_* measure: ``"gpu"`` (NVML device memory
                                           used, all processes), ``"torch_reserved"`` (CUDA
                                           without NVML) or ``"host_rss"`` (CPU run: RSS of the
                                           rank's main process, total = node memory, or the
                                           rank's cgroup limit (sbatch --mem) when lower)
  mem_total_gib                  float|null
  mem_avg_gib, mem_peak_gib      float|null average / peak over all samples (GiB)
  mem_avg_pct, mem_peak_pct      float|null the same as % of mem_total_gib
  torch_max_allocated_gib        float|null ``torch.cuda.max_memory_allocated`` (GiB)
  util_avg_pct, util_peak_pct    float|null NVML utilisation: % of time a kernel ran
  samples                        int       monitor samples taken
  batches, tiles                 int
  wall_s, data_wait_s,           float     seconds (see mgpr.monitor.callback timing model)
  compute_s
  stages_s                       obj       stage -> blocking seconds (``write``, ``postprocess``)
  tiles_per_s                    float     tiles / wall_s
  model_tiles                    int       of ``tiles``, those the model ran on (not nodata)
  values_clipped                 obj|null  valid values the value_range clamp moved: below,
                                           above, values (counts; per input in totals); null
                                           where none can clip
  steady_tiles_per_s             float|null the rate after the first batch (no start-up);
                                           null unless 2+ batches holding at least the first
                                           batch's tiles follow it
  data_wait_share,               float     data_wait_s / wall_s, compute_s / wall_s
  compute_share
  stage_shares                   obj       stage -> stages_s / wall_s
gpus[]                           list      one row per GPU device (NVML or torch uuid) per
                                           node; ranks sharing a device are counted once:
  hostname, gpu_uuid, gpu_name   str
  physical_index                 int|null  NVML index of the physical GPU
  ranks                          list[int] global ranks that used this device
  mem_total_gib, mem_peak_gib    float|null device memory, highest use seen by any of its ranks
  util_avg_pct                   float|null mean of its ranks' NVML utilisation averages (%)
totals                           obj
  ranks                          int       ranks reported
  nodes                          int       distinct hostnames
  tiles, batches                 int       over all reported ranks
  wall_s                         float     longest rank wall time (s)
  tiles_per_s                    float     tiles / wall_s (whole job)
  model_tiles, model_tiles_per_s int, float of those, the tiles the model ran on, and their rate
  values_clipped                 obj|null  the ranks' values_clipped summed (peak: the max),
                                           and per input path [below, above, values, peak]
                                           (null: none kept)
  data_wait_share,               float     summed over ranks, divided by summed wall time
  compute_share
  stage_shares                   obj       the same per stage
  gpus                           int       distinct GPU devices (rows of ``gpus``)
  gpu_util_avg_pct               float|null mean over GPU devices of util_avg_pct (a device
                                           shared by two ranks counts once)
  mem_peak_gib                   float|null highest mem_peak_gib of any rank
phases                           obj|null  where the command's time went, rank 0's wall clock
                                           (mgpr.monitor.phases); null without the command's
                                           start or when no rank ran its predict loop:
  startup_s                      float     command start (process start) -> earliest rank's
                                           predict loop start (s)
  predict_s                      float     -> latest rank's predict loop end (s)
  merge_outputs_s                float     -> this report's build (merge, outputs, previews; s)
hint                             str       one line: the bottleneck and what to change
plot                             str|null  ``"report.png"`` (relative to run_dir) or null
===============================  ========  ==================================================
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mgpr.monitor.hint import bottleneck_hint, phase_hint
from mgpr.monitor.phases import loop_span, run_phases
from mgpr.monitor.plot import plot_report
from mgpr.outputs.rundir import write_json_atomic

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "mgpr.monitor.report/1"
GIB = float(2**30)


def read_parts(
    run_dir: Path, world_size: int
) -> tuple[dict[int, dict[str, Any]], list[int], list[str]]:
    """Read ``run_dir/report_parts/rank*.json``.

    Returns:
        (parts by global rank, missing ranks of ``range(world_size)``, unreadable file names).
    """
    parts: dict[int, dict[str, Any]] = {}
    unreadable: list[str] = []
    folder = Path(run_dir) / "report_parts"
    for rank in range(world_size):
        path = folder / f"rank{rank}.json"
        if not path.exists():
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                parts[rank] = json.load(fh)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read report part %s: %s", path, exc)
            unreadable.append(path.name)
    missing = [r for r in range(world_size) if r not in parts]
    return parts, missing, unreadable


def wait_for_parts(
    run_dir: Path,
    world_size: int,
    timeout_s: float,
    poll_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Wait up to ``timeout_s`` seconds for every rank's part; returns the ranks still without one.

    For the report of a stopped run: SLURM signals every task of a step at once, and each
    rank writes its part as it stops, so rank 0 may get there first. The wait is bounded
    because SLURM kills the step ``KillWait`` seconds (default 30) after its signal.
    """
    folder = Path(run_dir) / "report_parts"
    deadline = clock() + max(0.0, timeout_s)
    while True:
        absent = [r for r in range(world_size) if not (folder / f"rank{r}.json").exists()]
        if not absent or clock() >= deadline:
            return absent
        sleep(poll_s)


def _gib(value: float | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def _round_or_none(value: Any, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _share(num: float, den: float) -> float:
    return round(num / den, 4) if den > 0 else 0.0


def _rank_row(part: Mapping[str, Any]) -> dict[str, Any]:
    stats = part.get("stats") or {}
    gpu = part.get("gpu") or {}
    wall = float(part.get("wall_s") or 0.0)
    if stats.get("mem_used_bytes_avg") is not None:
        kind, avg, peak = "gpu", stats["mem_used_bytes_avg"], stats.get("mem_used_bytes_peak")
        total = gpu.get("memory_total_bytes")
    elif stats.get("torch_reserved_bytes_avg") is not None:
        kind = "torch_reserved"
        avg, peak = stats["torch_reserved_bytes_avg"], stats.get("torch_reserved_bytes_peak")
        total = gpu.get("memory_total_bytes")
    else:
        kind, avg, peak = "host_rss", stats.get("rss_bytes_avg"), stats.get("rss_bytes_peak")
        # what the rank may use: a cgroup limit (sbatch --mem) below the node's memory wins
        total = part.get("host_memory_limit_bytes") or part.get("host_memory_total_bytes")

    def pct(value: float | None) -> float | None:
        return round(100.0 * value / total, 1) if value is not None and total else None

    util_avg = stats.get("util_pct_avg")
    stages = {k: float(v) for k, v in (part.get("stages_s") or {}).items()}
    return {
        "global_rank": int(part.get("global_rank", -1)),
        "local_rank": part.get("local_rank"),
        "node_rank": part.get("node_rank"),
        "hostname": part.get("hostname"),
        "device": part.get("device"),
        "status": part.get("status"),
        "error": part.get("error"),
        "gpu_name": gpu.get("name"),
        "gpu_uuid": gpu.get("uuid"),
        "physical_index": gpu.get("physical_index"),
        "memory_kind": kind,
        "mem_total_gib": _gib(total),
        "mem_avg_gib": _gib(avg),
        "mem_peak_gib": _gib(peak),
        "mem_avg_pct": pct(avg),
        "mem_peak_pct": pct(peak),
        "torch_max_allocated_gib": _gib(stats.get("torch_max_allocated_bytes_peak")),
        "util_avg_pct": None if util_avg is None else round(float(util_avg), 1),
        "util_peak_pct": stats.get("util_pct_peak"),
        "samples": int(stats.get("samples") or 0),
        "batches": int(part.get("batches") or 0),
        "tiles": int(part.get("tiles") or 0),
        "wall_s": round(wall, 3),
        "data_wait_s": round(float(part.get("data_wait_s") or 0.0), 3),
        "compute_s": round(float(part.get("compute_s") or 0.0), 3),
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "tiles_per_s": round(int(part.get("tiles") or 0) / wall, 3) if wall > 0 else 0.0,
        # parts written before model_tiles existed: every tile counted as a model tile
        "model_tiles": int(part.get("model_tiles", part.get("tiles")) or 0),
        "values_clipped": _without_inputs(part.get("values_clipped")),
        "steady_tiles_per_s": _round_or_none(part.get("steady_tiles_per_s"), 3),
        "data_wait_share": _share(float(part.get("data_wait_s") or 0.0), wall),
        "compute_share": _share(float(part.get("compute_s") or 0.0), wall),
        "stage_shares": {k: _share(v, wall) for k, v in stages.items()},
    }


def _gpu_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per GPU device per node, from the rank rows.

    NVML readings are per device (all processes), so two ranks on one device report the same
    memory and utilisation and must count once.
    """
    by_device: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["gpu_uuid"] and str(r["device"]).startswith("cuda"):
            by_device.setdefault((r["hostname"], r["gpu_uuid"]), []).append(r)
    out = []
    for (host, uuid), members in sorted(by_device.items(), key=lambda kv: str(kv[0])):
        utils = [m["util_avg_pct"] for m in members if m["util_avg_pct"] is not None]
        peaks = [m["mem_peak_gib"] for m in members if m["mem_peak_gib"] is not None]
        out.append(
            {
                "hostname": host,
                "gpu_uuid": uuid,
                "gpu_name": members[0]["gpu_name"],
                "physical_index": members[0]["physical_index"],
                "ranks": sorted(m["global_rank"] for m in members),
                "mem_total_gib": members[0]["mem_total_gib"],
                "mem_peak_gib": max(peaks) if peaks else None,
                "util_avg_pct": round(sum(utils) / len(utils), 1) if utils else None,
            }
        )
    return out


def _without_inputs(clipped: Any) -> dict[str, Any] | None:
    """A rank row's clip counts: its totals only (the per-input counts go to ``totals``)."""
    if not isinstance(clipped, dict):
        return None
    out: dict[str, Any] = {k: int(clipped.get(k) or 0) for k in ("below", "above", "values")}
    out["peak"] = clipped.get("peak")
    out["floor"] = clipped.get("floor")
    return out


def _sum_clipped(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' clip counts summed: totals, and per input ``[below, above, values]``."""
    per_input: dict[str, list[Any]] = {}
    for part in parts:
        for path, counts in (part.get("inputs") or {}).items():
            mine = per_input.setdefault(str(path), [0, 0, 0, None, None])
            for i in range(3):
                mine[i] += int(counts[i])
            if len(counts) > 3 and counts[3] is not None:  # the peak: a max, not a sum
                mine[3] = float(counts[3]) if mine[3] is None else max(mine[3], float(counts[3]))
            if len(counts) > 4 and counts[4] is not None:  # the floor: a min
                mine[4] = float(counts[4]) if mine[4] is None else min(mine[4], float(counts[4]))
    out: dict[str, Any] = {
        k: sum(int(p.get(k) or 0) for p in parts) for k in ("below", "above", "values")
    }
    peaks = [float(p["peak"]) for p in parts if p.get("peak") is not None]
    out["peak"] = max(peaks) if peaks else None
    floors = [float(p["floor"]) for p in parts if p.get("floor") is not None]
    out["floor"] = min(floors) if floors else None
    out["inputs"] = per_input
    return out


def _totals(
    rows: list[dict[str, Any]],
    gpus: list[dict[str, Any]],
    clipped: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The job's totals; ``clipped``: the parts' ``values_clipped`` (per-input counts too)."""
    wall_sum = sum(r["wall_s"] for r in rows)
    wall = max((r["wall_s"] for r in rows), default=0.0)
    tiles = sum(r["tiles"] for r in rows)
    model_tiles = sum(r["model_tiles"] for r in rows)
    stage_names = sorted({k for r in rows for k in r["stages_s"]})
    utils = [g["util_avg_pct"] for g in gpus if g["util_avg_pct"] is not None]
    peaks = [r["mem_peak_gib"] for r in rows if r["mem_peak_gib"] is not None]
    return {
        "ranks": len(rows),
        "nodes": len({r["hostname"] for r in rows}),
        # summed over the ranks that kept counts (none: null, nothing could clip)
        "values_clipped": _sum_clipped(clipped) if clipped else None,
        "tiles": tiles,
        "batches": sum(r["batches"] for r in rows),
        "wall_s": round(wall, 3),
        "tiles_per_s": round(tiles / wall, 3) if wall > 0 else 0.0,
        "model_tiles": model_tiles,
        "model_tiles_per_s": round(model_tiles / wall, 3) if wall > 0 else 0.0,
        "data_wait_share": _share(sum(r["data_wait_s"] for r in rows), wall_sum),
        "compute_share": _share(sum(r["compute_s"] for r in rows), wall_sum),
        "stage_shares": {
            k: _share(sum(r["stages_s"].get(k, 0.0) for r in rows), wall_sum) for k in stage_names
        },
        "gpus": len(gpus),
        "gpu_util_avg_pct": round(sum(utils) / len(utils), 1) if utils else None,
        "mem_peak_gib": max(peaks) if peaks else None,
    }


def build_report(run_dir: Path, world_size: int, context: dict[str, Any]) -> dict[str, Any]:
    """Merge all report parts into ``run_dir/report.json`` and ``run_dir/report.png``.

    Call on rank 0 only, after every rank has finished (barrier). Missing or unreadable parts
    are listed in the report, never fatal; a failing plot is logged and ``plot`` is null.

    Args:
        run_dir: the run directory holding ``report_parts/``.
        world_size: number of ranks the job started.
        context: run settings for the hint and the record: ``workers``, ``batch_size``,
            ``precision``, ``cpus_per_task`` (None -> ``os.cpu_count()``),
            ``nothing_predicted`` (why no tile reached the model, e.g. all nodata: then the
            hint says so instead of naming a bottleneck), ``nodata_tiles`` ((skipped, planned)
            for the whole job: at half or more the hint says the reads of nodata tiles are in
            its figures), ``command_start_unix_s`` (when the command started: ``phases`` and
            the hint's start-up / merge rule; None: no phases), anything else is stored as
            given.

    Returns:
        The report dict (schema in the module docstring).
    """
    run_dir = Path(run_dir)
    parts, missing, unreadable = read_parts(run_dir, world_size)
    rows = [_rank_row(parts[r]) for r in sorted(parts)]
    gpus = _gpu_rows(rows)
    clipped = [
        p["values_clipped"] for p in parts.values() if isinstance(p.get("values_clipped"), dict)
    ]
    totals = _totals(rows, gpus, clipped)
    cpus = context.get("cpus_per_task") or os.cpu_count() or 1
    cpu_run = bool(rows) and all(not str(r["device"]).startswith("cuda") for r in rows)
    stage_shares = dict(totals["stage_shares"])
    stage_shares["compute"] = totals["compute_share"]
    started = context.get("command_start_unix_s")
    phases = (
        None
        if started is None
        else run_phases(float(started), loop_span(parts.values()), time.time())
    )
    nothing = context.get("nothing_predicted")
    if nothing:
        hint = f"nothing to measure: {nothing}"
    elif rows and totals["tiles"] == 0:
        hint = (
            "nothing to measure: no tile was left for this run (an earlier run finished every "
            "planned tile; this one only merged)"
        )
    elif rows:
        hint = bottleneck_hint(
            totals["data_wait_share"],
            totals["gpu_util_avg_pct"],
            stage_shares,
            workers=int(context.get("workers") or 0),
            cpus=int(cpus),
            batch_size=int(context.get("batch_size") or 0),
            precision=str(context.get("precision") or "32-true"),
            cpu_run=cpu_run,
            untiled_inputs=context.get("untiled_inputs"),
            fake_delay_s=context.get("fake_delay_s"),
            batches=int(totals["batches"]),
            predict_s=float(totals["wall_s"]),
        )
        lead = phase_hint(phases)
        if lead:
            hint = f"{lead}; predict loop: {hint}"
        nodata = context.get("nodata_tiles")
        if nodata and nodata[0] >= 0.5 * nodata[1]:
            hint += (
                f"; {nodata[0]} of the {nodata[1]} planned tiles ({100 * nodata[0] / nodata[1]:.0f}"
                "%) are nodata: each is read, then skipped before the model, and tiles/s and the "
                "data wait count them"
            )
    else:
        hint = "no rank wrote a report part: every rank failed before predict ended"
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created_unix_s": round(time.time(), 3),
        "world_size": int(world_size),
        "ranks_reported": sorted(parts),
        "missing_ranks": missing,
        "failed_ranks": [r["global_rank"] for r in rows if r["status"] == "failed"],
        "interrupted_ranks": [r["global_rank"] for r in rows if r["status"] == "interrupted"],
        "unreadable_parts": unreadable,
        "context": dict(context),
        "ranks": rows,
        "gpus": gpus,
        "totals": totals,
        "phases": phases,
        "hint": hint,
        "plot": None,
    }
    if parts:
        try:
            plot_report(parts, rows, run_dir / "report.png")
            report["plot"] = "report.png"
        except Exception as exc:  # noqa: BLE001 - the plot is a nicety; the JSON must be written
            logger.warning("cannot draw %s: %s", run_dir / "report.png", exc)
    write_json_atomic(run_dir / "report.json", report)
    return report


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a text block: one line per GPU/rank, then totals, missing ranks and the hint.

    Example::

        rank host         device  gpu                      mem avg/peak GiB (%)   util ...
           0 node01       cuda:0  NVIDIA H100 80GB HBM3    12.3/14.1 of 79.6 (15/18%)  97% ...
        total: 4 ranks on 1 node(s), 12345 tiles in 120.5 s = 102.4 tiles/s; data wait 3%
        hint: compute-bound: GPUs 97% busy; a larger batch_size (now 16) or ... may help
    """
    lines = [
        f"{'rank':>4} {'host':<12} {'device':<7} {'gpu':<24} {'mem avg/peak GiB (%)':<30} "
        f"{'util':>5} {'batches':>7} {'tiles/s':>8} {'wait':>5}"
    ]
    for r in report.get("ranks", []):
        mem = (
            f"{_fmt(r['mem_avg_gib'])}/{_fmt(r['mem_peak_gib'])} of {_fmt(r['mem_total_gib'])} "
            f"({_fmt(r['mem_avg_pct'], '.0f')}/{_fmt(r['mem_peak_pct'], '.0f')}%)"
        )
        if r["memory_kind"] == "host_rss":
            mem = "RSS " + mem
        gpu = (r.get("gpu_name") or "-")[:24]
        util = "-" if r["util_avg_pct"] is None else f"{r['util_avg_pct']:.0f}%"
        status = r.get("status")
        flag = "" if status == "finished" else f"  {str(status).upper()}: {r.get('error')}"
        lines.append(
            f"{r['global_rank']:>4} {str(r['hostname'])[:12]:<12} {str(r['device']):<7} "
            f"{gpu:<24} {mem:<30} {util:>5} {r['batches']:>7} {r['tiles_per_s']:>8.1f} "
            f"{100 * r['data_wait_share']:>4.0f}%{flag}"
        )
    t = report.get("totals", {})
    stages = ", ".join(f"{k} {100 * v:.0f}%" for k, v in (t.get("stage_shares") or {}).items())
    util = t.get("gpu_util_avg_pct")
    lines.append(
        f"total: {t.get('ranks', 0)} of {report.get('world_size')} ranks on {t.get('nodes', 0)} "
        f"node(s), {t.get('tiles', 0)} tiles in {t.get('wall_s', 0.0):.1f} s = "
        f"{t.get('tiles_per_s', 0.0):.1f} tiles/s"
        + (
            f" ({t['model_tiles']} reached the model: {t['model_tiles_per_s']:.1f}/s)"
            if t.get("model_tiles") is not None and t["model_tiles"] != t.get("tiles")
            else ""
        )
        + "; data wait "
        f"{100 * t.get('data_wait_share', 0.0):.0f}%, "
        f"compute {100 * t.get('compute_share', 0.0):.0f}%"
        + (f", {stages}" if stages else "")
        + ("" if util is None else f"; GPU util {util:.0f}%")
    )
    if report.get("missing_ranks"):
        ranks = ", ".join(str(r) for r in report["missing_ranks"])
        lines.append(
            f"MISSING: no report part from rank(s) {ranks} (killed, out of memory, lost node?)"
        )
    if report.get("failed_ranks"):
        lines.append(f"FAILED: rank(s) {', '.join(str(r) for r in report['failed_ranks'])}")
    unfinished = (report.get("context") or {}).get("unfinished")
    if unfinished:
        lines.append(f"UNFINISHED: {unfinished}")
    lines.append(f"hint: {report.get('hint', '')}")
    return "\n".join(lines)
