"""Does a second rank double throughput? ``use_fake_data`` with a dominant per-tile delay.

Runs the real ``mgpr`` CLI twice (``gpus=1`` then ``gpus=2``; on a CPU machine these are gloo
DDP ranks) with ``model=null``, small tiles and ``dummy_dataset_delay`` large enough that the
sleep, not the CPU, sets the pace, and prints each run's predict-loop tiles/s (from the run
report) and the ratio. Target: 2 ranks >= 1.8x 1 rank.

    uv run python benchmarks/fake_data_scaling.py [--delay 0.2] [--count 160] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mgpr_run import run_mgpr


def run(ranks: int, a: argparse.Namespace, out: Path) -> tuple[float, float]:
    report, wall = run_mgpr(
        [
            "use_fake_data=true",
            f"dummy_dataset_delay={a.delay}",
            f"dummy_dataset_count={a.count}",
            f"gpus={ranks}",
            "accelerator=cpu",
            "model=null",
            "weights=none",
            f"tile_size={a.tile}",
            f"workers={a.workers}",
            f"batch_size={a.batch_size}",
        ],
        out,
    )
    totals = report["totals"]
    return float(totals["tiles_per_s"]), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay", type=float, default=0.2, help="seconds per fake tile")
    p.add_argument("--count", type=int, default=160, help="fake tiles in all")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    ideal = a.workers / a.delay
    with tempfile.TemporaryDirectory(prefix="mgpr-fake-") as tmp:
        one, wall1 = run(1, a, Path(tmp) / "r1")
        print(
            f"1 rank : {one:6.2f} tiles/s predict loop (ideal {ideal:.1f}); command {wall1:.1f} s"
        )
        two, wall2 = run(2, a, Path(tmp) / "r2")
        print(
            f"2 ranks: {two:6.2f} tiles/s predict loop (ideal {2 * ideal:.1f}); "
            f"command {wall2:.1f} s"
        )
    r = two / one
    print(f"2 ranks / 1 rank = {r:.2f}x (target >= 1.8: {'met' if r >= 1.8 else 'MISSED'})")


if __name__ == "__main__":
    main()
