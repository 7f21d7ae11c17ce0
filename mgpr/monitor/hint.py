"""The report's one-line hint: which part of the pipeline holds the run back, and what to change.

Pure rules over the shares the report measured (no IO), so each rule is tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Ranks waiting for tiles at least this share of the wall time -> "data-bound".
DATA_BOUND_SHARE = 0.25
#: A blocking ``write`` or ``postprocess`` stage taking at least this share -> "<stage>-bound".
STAGE_BOUND_SHARE = 0.25
#: Mean NVML utilisation at or above this (%) -> "compute-bound".
COMPUTE_BOUND_UTIL_PCT = 85.0
#: Mean NVML utilisation below this (%) without another bottleneck -> "underused".
LOW_UTIL_PCT = 50.0
#: A predict loop of fewer batches (all ranks) than this names no bottleneck: "too short".
MIN_BATCHES = 3
#: A predict loop shorter than this (seconds, slowest rank) names no bottleneck: "too short".
#: One command's data-wait share over a sub-second loop varied 19-47 % between three runs.
MIN_PREDICT_S = 2.0


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
    fake_delay_s: float | None = None,
    batches: int | None = None,
    predict_s: float | None = None,
) -> str:
    """One plain sentence naming the bottleneck and the knob to turn.

    Rules, first match wins (thresholds are the module constants):

    1. ``cpu_run``: ``"cpu run: ..."`` with the data-wait and compute shares (CPU figures say
       nothing about GPU throughput), then rule 2's verdict, or rule 3's, when one applies.
    2. Too short: fewer than :data:`MIN_BATCHES` batches or under :data:`MIN_PREDICT_S`
       seconds of predict loop (``batches`` / ``predict_s``; None: not checked):
       ``"too short to name a bottleneck: ..."`` (shares of a sub-second loop are noise).
    3. The largest of data wait, ``write`` and ``postprocess`` shares that is >= 25 % of wall
       time (:data:`DATA_BOUND_SHARE`, :data:`STAGE_BOUND_SHARE`): ``"data-bound: ..."`` (raise
       ``workers`` while it is below ``cpus - 1``, else more CPUs or tiled input),
       ``"write-bound: ..."`` or ``"postprocess-bound: ..."``.
    4. ``gpu_util_avg`` None (no NVML, MIG): ``"no GPU utilisation measured: ..."``.
    5. ``gpu_util_avg`` >= 85 % (:data:`COMPUTE_BOUND_UTIL_PCT`): ``"compute-bound: ..."``
       (larger ``batch_size``; bf16 unless precision is already 16-bit).
    6. ``gpu_util_avg`` < 50 % (:data:`LOW_UTIL_PCT`): ``"underused: ..."`` (per-step host
       overhead; larger ``batch_size``).
    7. Otherwise ``"balanced: ..."``.

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
        fake_delay_s: with ``use_fake_data``, its ``dummy_dataset_delay`` (seconds per tile):
            the data advice then names it (there is no input to tile, no worker to add that
            would not sleep too).
        batches: batches of all ranks; None: the too-short rule is not applied.
        predict_s: the predict loop's wall time, seconds (slowest rank); None: not applied.

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
    if fake_delay_s is not None:
        data_fix = (
            f"the fake data sleeps dummy_dataset_delay={fake_delay_s:g} s per tile in each "
            "worker: that is the wait, as an environment test means it to be"
            if fake_delay_s > 0
            else "fake data (use_fake_data=true) is made in the workers: raise workers"
        )
    short = _too_short(batches, predict_s)
    verdict = short or _stage_verdict(data_wait_share, stage_shares, data_fix)
    if cpu_run:
        compute = stage_shares.get("compute")
        what = f"data wait {_pct(data_wait_share)}"
        if compute is not None:
            what = f"compute {_pct(compute)}, " + what
        text = f"cpu run: no GPU used ({what}); these figures measure the CPU, not GPUs"
        return text + (f"; {verdict}" if verdict else "")
    if verdict:
        return verdict
    low_precision = any(tag in precision.lower() for tag in ("bf16", "16-", "fp16", "half"))
    return _gpu_verdict(data_wait_share, gpu_util_avg, batch_size, precision, low_precision)


def _too_short(batches: int | None, predict_s: float | None) -> str | None:
    """Rule 2's sentence, or None when the loop was long enough (or its size is unknown)."""
    few = batches is not None and batches < MIN_BATCHES
    brief = predict_s is not None and predict_s < MIN_PREDICT_S
    if not (few or brief):
        return None
    size = " in ".join(
        part
        for part in (
            None if batches is None else f"{batches} batch{'es' if batches != 1 else ''}",
            None if predict_s is None else f"{predict_s:.1f} s",
        )
        if part
    )
    return (
        f"too short to name a bottleneck: the predict loop ran {size} (at least "
        f"{MIN_BATCHES} batches and {MIN_PREDICT_S:g} s are needed for its shares to mean "
        "anything); predict more tiles to measure it"
    )


def _stage_verdict(
    data_wait_share: float, stage_shares: Mapping[str, float], data_fix: str
) -> str | None:
    """Rule 3: the largest of data wait, write and postprocess at >= 25 %, or None."""
    waited = f"ranks waited {_pct(data_wait_share)} of the time for tiles"
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
                f"postprocess-bound: postprocessing took {_pct(post)} of the time (turning "
                "each batch's outputs into boxes, masks or class maps on the host); fewer boxes "
                "per tile cost less: raise score_threshold or lower max_detections, and a "
                "model of your own should threshold and cap its boxes on the device",
            )
        )
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _gpu_verdict(
    data_wait_share: float,
    gpu_util_avg: float | None,
    batch_size: int,
    precision: str,
    low_precision: bool,
) -> str:
    """Rules 4-7: what the GPU utilisation says when no stage holds the loop back."""
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


def phase_hint(phases: Mapping[str, float] | None) -> str | None:
    """The command-level lead of the hint, or None when the predict loop is the main phase.

    Rule: when start-up or merge-and-outputs (``phases``:
    :func:`mgpr.monitor.phases.run_phases`) took longer than the predict loop, the larger of
    the two (the command's largest phase) leads the hint as ``"start-up-bound: ..."`` /
    ``"merge-bound: ..."``: the loop's own verdict, which follows, then matters less.
    """
    if not phases:
        return None
    total = sum(float(v) for v in phases.values())
    predict = float(phases.get("predict_s", 0.0))
    startup, merge = float(phases.get("startup_s", 0.0)), float(phases.get("merge_outputs_s", 0.0))
    name, took = ("start-up", startup) if startup >= merge else ("merge", merge)
    if total <= 0 or took <= predict:
        return None
    split = (
        f"{took:.1f} s of the {total:.1f} s command (start-up {startup:.1f} s, predict loop "
        f"{predict:.1f} s, merge and outputs {merge:.1f} s)"
    )
    if name == "start-up":
        return (
            f"start-up-bound: start-up (imports, input headers, weights, model build, rank "
            f"launch) took {split}; it does not grow with the tiles, so a bigger job per "
            "command pays it once; the log's timestamps show the slow step"
        )
    return (
        f"merge-bound: merging the ranks' parts and writing the outputs took {split}; "
        "previews=none skips the preview PNGs; the log's timestamps show the slow output"
    )
