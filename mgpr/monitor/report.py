"""Run report: merge every rank's part into ``report.json``, ``report.png`` and a text summary.

Runs on rank 0 after all ranks finished (the lead's barrier). Imports no Lightning; matplotlib
is imported (Agg backend) only inside :func:`plot_report`.

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
unreadable_parts                 list[str] part files that exist but could not be parsed
context                          obj       as passed by the caller: workers, batch_size,
                                           precision, cpus_per_task, ...
ranks[]                          list      one row per reported rank (= per GPU), by rank:
  global_rank, local_rank,       int
  node_rank
  hostname                       str       node name
  device                         str       ``"cuda:0"`` (local ordinal) or ``"cpu"``
  status                         str       ``"finished"`` / ``"failed"``
  error                          str|null  exception of a failed rank
  gpu_name, gpu_uuid             str|null  NVML (or torch) name and uuid
  physical_index                 int|null  NVML index of the GPU (null for MIG / no NVML)
  memory_kind                    str       what mem_* measure: ``"gpu"`` (NVML device memory
                                           used, all processes), ``"torch_reserved"`` (CUDA
                                           without NVML) or ``"host_rss"`` (CPU run: RSS of the
                                           rank's main process, total = node memory)
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
  steady_tiles_per_s             float|null the rate after the first batch (no start-up)
  data_wait_share,               float     data_wait_s / wall_s, compute_s / wall_s
  compute_share
  stage_shares                   obj       stage -> stages_s / wall_s
totals                           obj
  ranks                          int       ranks reported
  nodes                          int       distinct hostnames
  tiles, batches                 int       over all reported ranks
  wall_s                         float     longest rank wall time (s)
  tiles_per_s                    float     tiles / wall_s (whole job)
  data_wait_share,               float     summed over ranks, divided by summed wall time
  compute_share
  stage_shares                   obj       the same per stage
  gpu_util_avg_pct               float|null mean of the ranks' util_avg_pct
  mem_peak_gib                   float|null highest mem_peak_gib of any rank
hint                             str       one line: the bottleneck and what to change
plot                             str|null  ``"report.png"`` (relative to run_dir) or null
===============================  ========  ==================================================
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgpr.outputs.rundir import write_json_atomic

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "mgpr.monitor.report/1"
GIB = float(2**30)

#: Ranks waiting for tiles at least this share of the wall time -> "data-bound".
DATA_BOUND_SHARE = 0.25
#: A blocking ``write`` or ``postprocess`` stage taking at least this share -> "<stage>-bound".
STAGE_BOUND_SHARE = 0.25
#: Mean NVML utilisation at or above this (%) -> "compute-bound".
COMPUTE_BOUND_UTIL_PCT = 85.0
#: Mean NVML utilisation below this (%) without another bottleneck -> "underused".
LOW_UTIL_PCT = 50.0


def _pct(share: float) -> str:
    return f"{100.0 * share:.0f}%"


def bottleneck_hint(
    data_wait_share: float,
    gpu_util_avg: float | None,
    stage_shares: Mapping[str, float],
    workers: int,
    cpus: int,
    batch_size: int,
    precision: str,
    *,
    cpu_run: bool = False,
    untiled_inputs: int | None = None,
) -> str:
    """One plain sentence naming the bottleneck and the knob to turn.

    Rules, first match wins (thresholds are the module constants):

    1. ``cpu_run``: ``"cpu run: ..."`` with the data-wait and compute shares (CPU figures say
       nothing about GPU throughput), plus the data-bound advice when data wait >= 25 %.
    2. The largest of data wait, ``write`` and ``postprocess`` shares that is >= 25 % of wall
       time (:data:`DATA_BOUND_SHARE`, :data:`STAGE_BOUND_SHARE`): ``"data-bound: ..."`` (raise
       ``workers`` while it is below ``cpus - 1``, else more CPUs or tiled input),
       ``"write-bound: ..."`` or ``"postprocess-bound: ..."``.
    3. ``gpu_util_avg`` None (no NVML, MIG): ``"no GPU utilisation measured: ..."``.
    4. ``gpu_util_avg`` >= 85 % (:data:`COMPUTE_BOUND_UTIL_PCT`): ``"compute-bound: ..."``
       (larger ``batch_size``; bf16 unless precision is already 16-bit).
    5. ``gpu_util_avg`` < 50 % (:data:`LOW_UTIL_PCT`): ``"underused: ..."`` (per-step host
       overhead; larger ``batch_size``).
    6. Otherwise ``"balanced: ..."``.

    Args:
        data_wait_share: time ranks waited for batches / wall time, 0-1.
        gpu_util_avg: mean NVML utilisation over GPUs, %, or None when not measured.
        stage_shares: stage name -> share of wall time, 0-1 (``write``, ``postprocess``; a
            ``compute`` entry is used for the CPU message).
        workers: DataLoader workers per rank.
        cpus: CPUs available to each rank (SLURM ``--cpus-per-task``).
        batch_size: tiles per batch.
        precision: Lightning precision string, e.g. ``"32-true"``, ``"bf16-mixed"``.
        cpu_run: True when no rank used a GPU.
        untiled_inputs: how many inputs are stored in strips rather than tiles (windowed reads
            then decode whole rows); None when unknown. The data-bound advice suggests
            ``gdal_translate -co TILED=YES`` only when this is not 0.

    Returns:
        The hint, starting with its category and a colon.
    """
    workers, cpus = int(workers), int(cpus)
    if workers < cpus - 1:
        more = min(cpus - 1, max(workers * 2, workers + 2))
        data_fix = f"raise workers (now {workers}; this task has {cpus} CPUs, try {more})"
    else:
        data_fix = (
            f"workers ({workers}) already use the task's {cpus} CPUs: ask for more CPUs "
            "(sbatch --cpus-per-task)"
        )
        if untiled_inputs is None:
            data_fix += (
                " or use tiled/COG input (gdal_translate -co TILED=YES) so windowed reads are cheap"
            )
        elif untiled_inputs:
            data_fix += (
                f"; {untiled_inputs} input(s) are stored in strips: convert them with "
                "gdal_translate -co TILED=YES so windowed reads decode only their tiles"
            )
    waited = f"ranks waited {_pct(data_wait_share)} of the time for tiles"
    if cpu_run:
        compute = stage_shares.get("compute")
        what = f"data wait {_pct(data_wait_share)}"
        if compute is not None:
            what = f"compute {_pct(compute)}, " + what
        text = f"cpu run: no GPU used ({what}); these figures measure the CPU, not GPUs"
        if data_wait_share >= DATA_BOUND_SHARE:
            text += f"; data loading is slow too: {data_fix}"
        return text
    candidates: list[tuple[float, str]] = []
    if data_wait_share >= DATA_BOUND_SHARE:
        candidates.append((data_wait_share, f"data-bound: {waited}; {data_fix}"))
    write = stage_shares.get("write", 0.0)
    if write >= STAGE_BOUND_SHARE:
        candidates.append(
            (
                write,
                f"write-bound: writing results took {_pct(write)} of the time; write to "
                "node-local or faster storage, write fewer fields, or write off the main thread",
            )
        )
    post = stage_shares.get("postprocess", 0.0)
    if post >= STAGE_BOUND_SHARE:
        candidates.append(
            (
                post,
                f"postprocess-bound: postprocessing took {_pct(post)} of the time; keep it on "
                "the GPU (batched NMS, thresholds before .cpu()) or raise the score threshold",
            )
        )
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    low_precision = any(tag in precision.lower() for tag in ("bf16", "16-", "fp16", "half"))
    if gpu_util_avg is None:
        return (
            f"no GPU utilisation measured (NVML missing or MIG): data wait only "
            f"{_pct(data_wait_share)}, so probably compute-bound; a larger batch_size "
            f"(now {batch_size})"
            + ("" if low_precision else " or precision=bf16-mixed")
            + " may help"
        )
    if gpu_util_avg >= COMPUTE_BOUND_UTIL_PCT:
        if low_precision:
            fix = (
                f"a larger batch_size (now {batch_size}) may help; precision is already {precision}"
            )
        else:
            fix = f"a larger batch_size (now {batch_size}) or precision=bf16-mixed may help"
        return f"compute-bound: GPUs {gpu_util_avg:.0f}% busy; {fix}"
    if gpu_util_avg < LOW_UTIL_PCT:
        return (
            f"underused: GPUs only {gpu_util_avg:.0f}% busy although ranks waited just "
            f"{_pct(data_wait_share)} for tiles; per-step host work (kernel launches, CPU "
            f"postprocess, syncs) limits it: raise batch_size (now {batch_size})"
        )
    return (
        f"balanced: GPUs {gpu_util_avg:.0f}% busy, data wait {_pct(data_wait_share)}; "
        "no single bottleneck"
    )


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
        total = part.get("host_memory_total_bytes")

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
        "steady_tiles_per_s": _round_or_none(part.get("steady_tiles_per_s"), 3),
        "data_wait_share": _share(float(part.get("data_wait_s") or 0.0), wall),
        "compute_share": _share(float(part.get("compute_s") or 0.0), wall),
        "stage_shares": {k: _share(v, wall) for k, v in stages.items()},
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    wall_sum = sum(r["wall_s"] for r in rows)
    wall = max((r["wall_s"] for r in rows), default=0.0)
    tiles = sum(r["tiles"] for r in rows)
    stage_names = sorted({k for r in rows for k in r["stages_s"]})
    utils = [r["util_avg_pct"] for r in rows if r["util_avg_pct"] is not None]
    peaks = [r["mem_peak_gib"] for r in rows if r["mem_peak_gib"] is not None]
    return {
        "ranks": len(rows),
        "nodes": len({r["hostname"] for r in rows}),
        "tiles": tiles,
        "batches": sum(r["batches"] for r in rows),
        "wall_s": round(wall, 3),
        "tiles_per_s": round(tiles / wall, 3) if wall > 0 else 0.0,
        "data_wait_share": _share(sum(r["data_wait_s"] for r in rows), wall_sum),
        "compute_share": _share(sum(r["compute_s"] for r in rows), wall_sum),
        "stage_shares": {
            k: _share(sum(r["stages_s"].get(k, 0.0) for r in rows), wall_sum) for k in stage_names
        },
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
            ``precision``, ``cpus_per_task`` (None -> ``os.cpu_count()``), anything else is
            stored as given.

    Returns:
        The report dict (schema in the module docstring).
    """
    run_dir = Path(run_dir)
    parts, missing, unreadable = read_parts(run_dir, world_size)
    rows = [_rank_row(parts[r]) for r in sorted(parts)]
    totals = _totals(rows)
    cpus = context.get("cpus_per_task") or os.cpu_count() or 1
    cpu_run = bool(rows) and all(not str(r["device"]).startswith("cuda") for r in rows)
    stage_shares = dict(totals["stage_shares"])
    stage_shares["compute"] = totals["compute_share"]
    if rows:
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
        "unreadable_parts": unreadable,
        "context": dict(context),
        "ranks": rows,
        "totals": totals,
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


def plot_report(
    parts: Mapping[int, Mapping[str, Any]], rows: list[dict[str, Any]], path: Path
) -> None:
    """Draw memory (and utilisation) over time per rank and the time split per rank to ``path``.

    GPU runs: NVML memory used (GiB) and utilisation (%) per GPU over time. CPU runs: host RSS
    per rank. Bottom panel: share of wall time per rank spent on data wait, compute, stages and
    the rest. Written via a temp file and ``os.replace``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_rank = {r["global_rank"]: r for r in rows}
    has_util = any(r["util_avg_pct"] is not None for r in rows)
    n_axes = 3 if has_util else 2
    fig, axes = plt.subplots(n_axes, 1, figsize=(10, 3.2 * n_axes), dpi=100)
    try:
        ax_mem = axes[0]
        ax_util = axes[1] if has_util else None
        ax_bar = axes[-1]
        field = {"gpu": "mem_used_bytes", "torch_reserved": "torch_reserved_bytes"}
        kinds = set()
        for rank in sorted(parts):
            samples = parts[rank].get("samples") or {}
            row = by_rank[rank]
            kinds.add(row["memory_kind"])
            label = f"rank {rank} {row['device']} @ {row['hostname']}"
            t = samples.get("t_s") or []
            mem = samples.get(field.get(row["memory_kind"], "rss_bytes")) or []
            pts = [(a, b / GIB) for a, b in zip(t, mem, strict=False) if b is not None]
            if pts:
                ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.2)
            if ax_util is not None:
                util = samples.get("util_pct") or []
                upts = [(a, b) for a, b in zip(t, util, strict=False) if b is not None]
                if upts:
                    ax_util.plot([p[0] for p in upts], [p[1] for p in upts], label=label, lw=1.2)
        what = "host RSS per rank" if kinds == {"host_rss"} else "GPU memory used per GPU"
        ax_mem.set_title(what)
        ax_mem.set_ylabel("GiB")
        ax_mem.set_xlabel("time since predict start (s)")
        ax_mem.grid(alpha=0.3)
        if len(parts) <= 16:
            ax_mem.legend(fontsize=7, loc="best")
        if ax_util is not None:
            ax_util.set_title("GPU utilisation (NVML: share of time a kernel ran)")
            ax_util.set_ylabel("%")
            ax_util.set_ylim(0, 105)
            ax_util.set_xlabel("time since predict start (s)")
            ax_util.grid(alpha=0.3)
        names = [f"r{r['global_rank']}" for r in rows]
        xs = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        stage_names = sorted({k for r in rows for k in r["stage_shares"]})
        series: list[tuple[str, list[float], str | None]] = [
            ("data wait", [r["data_wait_share"] for r in rows], "tab:red")
        ]
        series.append(("compute", [r["compute_share"] for r in rows], "tab:green"))
        for name in stage_names:
            series.append((name, [r["stage_shares"].get(name, 0.0) for r in rows], None))
        used = [sum(s[1][i] for s in series) for i in xs]
        series.append(("other", [max(0.0, 1.0 - u) for u in used], "lightgrey"))
        for label, values, color in series:
            pct = [100.0 * v for v in values]
            ax_bar.bar(xs, pct, bottom=bottom, label=label, color=color)
            bottom = [b + p for b, p in zip(bottom, pct, strict=True)]
        ax_bar.set_xticks(xs, names)
        ax_bar.set_ylabel("% of wall time")
        ax_bar.set_ylim(0, 118)
        ax_bar.set_title("time split per rank (data wait = waiting for tiles)")
        ax_bar.legend(fontsize=7, loc="upper right", ncol=len(series))
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)


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
        flag = "" if r.get("status") == "finished" else f"  FAILED: {r.get('error')}"
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
        f"{t.get('tiles_per_s', 0.0):.1f} tiles/s; data wait "
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
    lines.append(f"hint: {report.get('hint', '')}")
    return "\n".join(lines)
