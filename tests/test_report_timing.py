"""The run report's clocks against planted timings: fake data that sleeps a known time per tile.

``use_fake_data=true dummy_dataset_delay=D`` with one worker cannot deliver more than 1 / D
tiles per second, so a reported rate above that ceiling means the clock missed some of the
loading. Ratios are compared loosely (no timed assertion can fail on a slow machine).
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_mgpr_inprocess

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
