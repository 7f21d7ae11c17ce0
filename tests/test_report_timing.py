"""The run report's clocks against planted timings: fake data that sleeps a known time per tile.

``use_fake_data=true dummy_dataset_delay=D`` with one worker cannot deliver more than 1 / D
tiles per second, so a reported rate above that ceiling means the clock missed some of the
loading. Ratios are compared loosely (no timed assertion can fail on a slow machine).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
from pathlib import Path

import pytest
from conftest import mgpr_cmd, run_mgpr_inprocess, subprocess_env

from mgpr.monitor.callback import RunMonitor, steady_rate
from mgpr.monitor.hint import MIN_BATCHES, MIN_PREDICT_S, bottleneck_hint, phase_hint
from mgpr.monitor.phases import loop_span, run_phases
from mgpr.monitor.progress import Progress

DELAY_S = 0.1
TILES = 12


def _fake_run(run: Path, *extra: str) -> tuple[dict, dict]:
    rc = run_mgpr_inprocess(
        "use_fake_data=true",
        f"dummy_dataset_delay={DELAY_S}",
        f"dummy_dataset_count={TILES}",
        "model=null",
        "tile_size=64",
        "batch_size=4",
        "workers=1",
        "progress=false",
        f"output_dir={run}",
        *extra,
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    return summary, report


def test_first_batch_counts_so_tiles_per_s_stays_under_the_loaders_ceiling(tmp_path: Path) -> None:
    """Lightning fetches the first batch before on_predict_start: the clock starts earlier."""
    summary, report = _fake_run(tmp_path / "run")
    ceiling = 1.0 / DELAY_S  # one worker sleeping DELAY_S per tile
    assert summary["tiles_per_s"] <= 1.05 * ceiling, (summary["tiles_per_s"], ceiling)
    rank = report["ranks"][0]
    # every tile's sleep is waited for (the first batch's too), compute is near nothing
    assert rank["data_wait_s"] >= 0.8 * TILES * DELAY_S, rank
    assert rank["wall_s"] >= TILES * DELAY_S * 0.95, rank


def test_phases_split_the_whole_command_and_the_summary_prints_them(tmp_path: Path, capsys) -> None:
    summary, report = _fake_run(tmp_path / "run")
    phases = summary["phases"]
    assert sum(phases.values()) == pytest.approx(summary["wall_s"], abs=0.01)
    assert phases["predict_s"] == pytest.approx(summary["predict_loop_s"], abs=0.01)
    assert phases["startup_s"] > 0 and phases["merge_outputs_s"] >= 0
    # the report's phases end at its build; the summary's merge phase holds that build too
    assert report["phases"]["startup_s"] == phases["startup_s"]
    assert report["phases"]["merge_outputs_s"] <= phases["merge_outputs_s"]
    out = capsys.readouterr().out
    assert f"  time         start-up {phases['startup_s']:.1f} s, predict " in out


def test_whole_command_runs_from_the_process_start_to_after_the_report(tmp_path: Path) -> None:
    """A fresh interpreter: wall_s starts before Python's imports (not at the run's first line)
    and ends after report.json is written."""
    run = tmp_path / "run"
    before = time.time()
    cmd = mgpr_cmd(
        "use_fake_data=true", "dummy_dataset_count=4", "model=null", "tile_size=64",
        "workers=0", "progress=false", f"output_dir={run}",
    )  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    started = summary["command_start_unix_s"]
    assert before - 0.05 <= started <= before + 1.0  # the process start, 10 ms ticks
    assert report["created_unix_s"] <= started + summary["wall_s"]


def test_phase_arithmetic_clamps_and_sums() -> None:
    assert run_phases(100.0, (107.5, 113.6), 121.3) == {
        "startup_s": 7.5,
        "predict_s": 6.1,
        "merge_outputs_s": 7.7,
    }
    # a rank's clock a little behind rank 0's: no negative phase
    assert run_phases(100.0, (99.0, 98.0), 101.0) == {
        "startup_s": 0.0,
        "predict_s": 0.0,
        "merge_outputs_s": 1.0,
    }
    assert run_phases(100.0, None, 101.0) is None
    parts = [
        {"predict_start_unix_s": 10.0, "wall_s": 5.0},
        {"predict_start_unix_s": 9.0, "wall_s": 4.0},
        {"predict_start_unix_s": None, "wall_s": 0.0},  # a rank that ran no loop
    ]
    assert loop_span(parts) == (9.0, 15.0)
    assert loop_span([{"predict_start_unix_s": None, "wall_s": 0.0}]) is None


def test_hint_leads_with_the_phase_that_took_longest() -> None:
    """The rule: start-up or merge longer than the predict loop leads (the larger of them)."""
    merge = phase_hint({"startup_s": 7.5, "predict_s": 6.1, "merge_outputs_s": 7.7})
    assert merge is not None and merge.startswith("merge-bound: ")
    assert "7.7 s of the 21.3 s command" in merge and "previews=none" in merge
    start = phase_hint({"startup_s": 9.0, "predict_s": 2.0, "merge_outputs_s": 1.0})
    assert start is not None and start.startswith("start-up-bound: ")
    assert phase_hint({"startup_s": 3.0, "predict_s": 20.0, "merge_outputs_s": 3.0}) is None
    assert phase_hint({"startup_s": 3.0, "predict_s": 3.0, "merge_outputs_s": 2.0}) is None
    assert phase_hint(None) is None


HINT = {"workers": 2, "cpus": 16, "batch_size": 16, "precision": "32-true"}


def test_cpu_hint_names_postprocess_and_write_bound() -> None:
    """The CPU rule said only 'cpu run: ...' although postprocess took 30 % of the time."""
    post = bottleneck_hint(0.16, None, {"compute": 0.54, "postprocess": 0.30}, **HINT, cpu_run=True)
    assert post.startswith("cpu run: no GPU used (compute 54%, data wait 16%)")
    assert "postprocess-bound: postprocessing took 30% of the time" in post
    write = bottleneck_hint(0.3, None, {"compute": 0.2, "write": 0.45}, **HINT, cpu_run=True)
    assert "write-bound: writing results took 45%" in write and "data-bound" not in write
    data = bottleneck_hint(0.6, None, {"compute": 0.3}, **HINT, cpu_run=True)
    assert "data-bound: ranks waited 60%" in data


def test_a_short_run_names_no_bottleneck() -> None:
    """Under MIN_BATCHES batches or MIN_PREDICT_S seconds the shares are noise."""
    short = bottleneck_hint(0.47, 30.0, {}, **HINT, batches=1, predict_s=0.062)
    assert short.startswith("too short to name a bottleneck: the predict loop ran 1 batch in 0.1 s")
    assert "data-bound" not in short
    brief = bottleneck_hint(0.6, 30.0, {}, **HINT, batches=20, predict_s=1.5)
    assert brief.startswith("too short")
    cpu = bottleneck_hint(0.6, None, {"compute": 0.3}, **HINT, cpu_run=True, batches=2, predict_s=9)
    assert cpu.startswith("cpu run: ") and "too short to name" in cpu and "data-bound" not in cpu
    long = bottleneck_hint(0.6, 30.0, {}, **HINT, batches=MIN_BATCHES, predict_s=MIN_PREDICT_S)
    assert long.startswith("data-bound")


def test_steady_rate_needs_a_window_of_batches_after_the_first(tmp_path: Path) -> None:
    """Two batches (4 tiles, then 1): the 1-tile batch alone is no steady rate."""
    now = [0.0]
    monitor = RunMonitor(tmp_path, interval_s=1.0, progress=False)
    monitor._clock = lambda: now[0]
    monitor.t0 = 0.0
    for end, n in ((2.0, 4), (3.8, 1)):
        monitor.on_predict_batch_start(None, None, {"index": [0] * n}, 0)  # type: ignore[arg-type]
        now[0] = end
        monitor.on_predict_batch_end(None, None, None, {"index": [0] * n}, 0)  # type: ignore[arg-type]
    assert monitor.part()["steady_tiles_per_s"] is None
    assert steady_rate(3, 9, 4, 2.0) == pytest.approx(2.5)  # 4 + 1 tiles after the first 4
    assert steady_rate(3, 6, 4, 2.0) is None  # 2 tiles after a 4-tile first batch
    assert steady_rate(2, 8, 4, 1.0) is None  # one batch after the first


def test_final_progress_line_counts_the_ranks_that_finished_after_rank_0(caplog) -> None:
    """Rank 0 closes its display when its own loop ends; the job's last line comes after."""
    done = [1032]
    log = Progress(t0=0.0, total=1296, source=lambda: done[0], tty=False, log_every_s=30,
                   stream=io.StringIO())  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mgpr.monitor.progress"):
        log.close(10.0)
        done[0] = 1296  # rank 1's last tiles
        log.final(12.0)
        log.final(13.0)  # nothing moved: no second line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("progress: 1296/1296 tiles (100.0%)") and len(lines) == 2


def test_two_ranks_last_progress_line_is_the_whole_job(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = mgpr_cmd(
        "use_fake_data=true", "dummy_dataset_count=24", "dummy_dataset_delay=0.02",
        "model=null", "tile_size=64", "batch_size=2", "workers=0", "progress=false",
        "gpus=2", "accelerator=cpu", f"output_dir={run}",
    )  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in (run / "logs" / "rank0.log").read_text().splitlines() if "progress: " in x]
    assert lines and "progress: 24/24 tiles (100.0%)" in lines[-1], lines
