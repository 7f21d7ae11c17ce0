"""bf16 vs fp32 and compiled vs eager, compute alone and the whole run, ratios in one run.

For each model (resnet50, fasterrcnn; ``weights=none``) at ``--tile`` px:

1. compute alone: ``prepare`` + ``forward`` on a device-resident batch of the raster's own tiles,
   through the run's code (mgpr's adapters, :func:`mgpr.models.compile.compile_adapter`), for
   fp32 and bf16 autocast + channels_last, eager and compiled (the first call's time, i.e. the
   compile, is printed separately; the GPU preset leaves fp32 compiled out, for time), at
   ``--batch`` and, bf16 eager, over ``--batch-sizes``;
   every setting is built first, then timed in ``--rounds`` interleaved rounds (median);
2. the whole ``mgpr`` run (the real CLI, ``workers`` processes, writing included) for the same
   settings at ``--batch`` (``--sweep-runs``: the sweep too; ``precision=32|bf16-mixed``,
   ``compile=false|true``): its rate after the first
   batch, so the compile is not in it, and its data-wait share; ``--run-rounds`` interleaved
   rounds, the best kept;
3. ratios: bf16 / fp32, compiled / eager, whole run / compute alone, each from rows measured in
   this run (the machine may be shared);
4. ``--agreement``: box agreement of Faster R-CNN bf16 vs fp32 and compiled vs eager on the
   seeded, well-conditioned checkpoint of ``tests/test_exact_boxes.py`` (matched boxes: same
   label, one-to-one, IoU >= 0.9; the largest edge difference in pixels).

``--budget-s`` bounds the whole script: rows that would start after it are skipped and listed
(the GPU check script must finish in minutes). Figures, not assertions.

    uv run python benchmarks/accel.py --cpu --agreement          # 512 px, a few batches each
    python3 benchmarks/accel.py --gpu --out OUT/accel.json       # 1024 px, batch sweep 8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mgpr_run import run_mgpr
from pipeline import benchmark_raster, cpu_name, raster_batch

from mgpr.data.scaling import ValueScaler
from mgpr.models import build_model
from mgpr.models.compile import compile_adapter
from mgpr.run.accel import COMPILE_MODE

RESULTS: dict[str, Any] = {"compute": [], "runs": [], "ratios": {}, "skipped": [], "agreement": {}}
T0 = time.time()


def over_budget(budget_s: float, what: str) -> bool:
    if time.time() - T0 <= budget_s:
        return False
    print(f"SKIPPED (over --budget-s {budget_s:.0f}): {what}", flush=True)
    RESULTS["skipped"].append(what)
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One model built for one precision / compile setting, warmed up (compiled) once."""

    def __init__(
        self, name: str, path: str, tile: int, batch: int, bf16: bool, compiled: bool
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as a CUDA rank does
        torch.manual_seed(0)
        self.name, self.batch, self.bf16 = name, batch, bf16
        self.adapter = build_model(name, "none", tile_size=tile)
        self.adapter.module.to(self.device)
        if bf16:
            self.adapter.module.to(memory_format=torch.channels_last)
        self.outcome = None
        if compiled:
            self.outcome = compile_adapter(
                self.adapter, requested="true", mode=COMPILE_MODE, reason="bench"
            )
        self.x = raster_batch(path, tile, batch).to(self.device)
        start = time.perf_counter()
        self.step()
        self.first_call_s = time.perf_counter() - start
        self.step()  # a second warm-up: allocator, autotuned kernels settled
        self.rates: list[float] = []

    def step(self) -> None:
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            self.adapter.forward(self.adapter.prepare(ValueScaler()(self.x)))
        sync(self.device)

    def time(self, batches: int) -> None:
        start = time.perf_counter()
        for _ in range(batches):
            self.step()
        self.rates.append(batches * self.batch / (time.perf_counter() - start))


def compute_rows(
    name: str,
    path: str,
    tile: int,
    settings: list[tuple[bool, bool, int]],
    batches: int,
    rounds: int,
    budget_s: float,
) -> dict[tuple[bool, bool, int], dict[str, Any]]:
    """Tiles/s of prepare + forward per (bf16, compiled, batch), rounds interleaved (median).

    Every setting is built and warmed up (compiled) first, then timed in turn, ``rounds``
    times: a load change on a shared machine hits every setting alike.
    """
    built: dict[tuple[bool, bool, int], Variant] = {}
    for bf16, compiled, batch in settings:
        if over_budget(budget_s, f"compute {name} bf16={bf16} compiled={compiled} b{batch}"):
            continue
        built[(bf16, compiled, batch)] = Variant(name, path, tile, batch, bf16, compiled)
    for _ in range(rounds):
        for variant in built.values():
            variant.time(batches)
    rows = {}
    for (bf16, compiled, batch), v in built.items():
        row = {
            "model": name,
            "precision": "bf16+cl" if bf16 else "fp32",
            "compile": v.outcome.used if v.outcome else "eager",
            "batch": batch,
            "tiles_per_s": float(np.median(v.rates)),
            "tiles_per_s_rounds": v.rates,
            "first_call_s": v.first_call_s,
        }
        if v.outcome and v.outcome.used != "compiled":
            row["fallback"] = v.outcome.reason
        RESULTS["compute"].append(row)
        rows[(bf16, compiled, batch)] = row
        print(
            f"compute   {name:<10} {row['precision']:<7} {row['compile']:<8} b{batch:<3} "
            f"{row['tiles_per_s']:9.2f} tiles/s (median of {len(v.rates)} interleaved rounds)"
            f"   first call {v.first_call_s:6.1f} s",
            flush=True,
        )
    built.clear()
    return rows


def whole_run(
    name: str, path: str, tile: int, batch: int, bf16: bool, compiled: bool, workers: int, out: Path
) -> dict[str, Any]:
    """The real CLI; its rate after the first batch and its data-wait share."""
    report, wall = run_mgpr(
        [
            f"input_path={path}",
            f"model={name}",
            "weights=none",
            f"tile_size={tile}",
            "overlap=0",
            f"workers={workers}",
            f"batch_size={batch}",
            f"precision={'bf16-mixed' if bf16 else '32'}",
            f"compile={'true' if compiled else 'false'}",
        ],
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    part = json.loads((out / "report_parts" / "rank0.json").read_text())
    totals = report["totals"]
    row = {
        "model": name,
        "precision": "bf16" if bf16 else "fp32",
        "compile": (summary.get("compile") or {}).get("used", "eager"),
        "batch": batch,
        "tiles": totals["tiles"],
        "steady_tiles_per_s": part.get("steady_tiles_per_s"),
        "loop_tiles_per_s": totals["tiles_per_s"],
        "data_wait_share": totals["data_wait_share"],
        "command_s": wall,
    }
    RESULTS["runs"].append(row)
    steady = row["steady_tiles_per_s"]
    print(
        f"whole run {name:<10} {row['precision']:<7} {row['compile']:<8} b{batch:<3} "
        + (f"{steady:9.2f} tiles/s after the first batch" if steady else "  n/a")
        + f", data wait {row['data_wait_share']:.0%}, {row['tiles']} tiles, "
        f"command {wall:.0f} s",
        flush=True,
    )
    return row


def ratio(key: str, a: float | None, b: float | None) -> None:
    if not a or not b:
        print(f"  {key:<58} n/a")
        return
    RESULTS["ratios"][key] = a / b
    print(f"  {key:<58} {a / b:6.2f}x")


def agreement(tile: int) -> None:
    """Faster R-CNN boxes: bf16 vs fp32, compiled vs eager (seeded checkpoint of the tests)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_exact_boxes import SPEC, match_boxes, seeded_fasterrcnn_state

    from mgpr.testimage import render_block

    state = seeded_fasterrcnn_state(tile)
    tiles = torch.from_numpy(np.stack([render_block(SPEC, 0, c, tile, tile) for c in (0, tile)]))

    def adapter() -> Any:
        a = build_model("fasterrcnn", "none", tile_size=tile, score_threshold=0.0)
        a.module.load_state_dict(state)
        return a

    eager, compiled = adapter(), adapter()
    torch._dynamo.reset()
    compile_adapter(compiled, requested="true", mode=COMPILE_MODE, reason="bench")
    with torch.inference_mode():
        fp32 = eager.predict(tiles, tile)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs = eager.prepare(ValueScaler()(tiles))
            bf16 = eager.postprocess(eager.forward(inputs), tile)
        comp = compiled.predict(tiles, tile)
    for key, other in (("bf16 vs fp32", bf16), ("compiled vs eager (fp32)", comp)):
        matched = total = 0
        worst = 0.0
        for ref, got in zip(fp32, other, strict=True):
            pairs = match_boxes(got, ref, 0.9)
            total += len(ref)
            matched += len(pairs)
            for i, j in pairs:
                worst = max(worst, float(np.abs(got.boxes[i] - ref.boxes[j]).max()))
        RESULTS["agreement"][key] = {
            "fp32_boxes": total,
            "matched_share": matched / max(1, total),
            "max_edge_error_px": worst,
        }
        print(
            f"boxes {key:<26} {matched}/{total} fp32 boxes matched ({matched / max(1, total):.0%}),"
            f" max edge difference {worst:.4f} px ({tile} px tiles, seeded checkpoint)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,fasterrcnn")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--size", type=int, default=2048, help="raster edge for the whole runs (px)")
    p.add_argument("--batch", type=int, default=4, help="batch of the precision/compile rows")
    p.add_argument("--batch-sizes", default="", help="bf16 eager sweep, e.g. 8,16,32")
    p.add_argument("--batches", type=int, default=3, help="timed batches per compute round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved compute rounds (median)")
    p.add_argument("--run-rounds", type=int, default=1, help="interleaved whole runs (best)")
    p.add_argument("--sweep-runs", action="store_true", help="whole runs for the sweep too")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=3600.0)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--no-runs", action="store_true", help="compute rows only")
    p.add_argument("--agreement", action="store_true", help="box agreement (CPU, seeded)")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="CPU preset: 512 px, 2048 px raster, batch 4, 3 rounds of 1 batch, 2 of each run",
    )
    p.add_argument(
        "--gpu", action="store_true", help="GPU preset: 1024 px, 16384 px raster, batch 16, 8,16,32"
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.cpu:
        a.tile, a.size, a.batch, a.batches, a.rounds, a.run_rounds = 512, 2048, 4, 1, 3, 2
    if a.gpu:
        a.tile, a.size, a.batch, a.batches, a.rounds = 1024, 16384, 16, 10, 3
        a.batch_sizes = a.batch_sizes or "8,16,32"
        a.workers = max(2, (os.cpu_count() or 4) - 2)
    cuda = torch.cuda.is_available()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU {cpu_name()}",
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
    }
    RESULTS["machine"] = machine
    RESULTS["args"] = {k: str(v) for k, v in vars(a).items()}
    print(f"machine: {machine}", flush=True)
    models = [m for m in a.models.split(",") if m]
    sweep = [int(b) for b in a.batch_sizes.split(",") if b and int(b) != a.batch]
    variants = [(False, False), (True, False)]
    if not a.no_compile:
        variants.append((True, True))  # bf16 compiled: the default path on fast-bf16 devices
        if not a.gpu:
            variants.append((False, True))  # fp32 compiled (GPU preset: left out for time)
    with tempfile.TemporaryDirectory(prefix="mgpr-accel-") as tmp_s:
        tmp = Path(tmp_s)
        img = benchmark_raster(tmp / "ortho.tif", a.size, 0.1)
        path = str(img.path)
        print(f"raster {a.size} px, {a.tile} px tiles: {(a.size // a.tile) ** 2} tiles", flush=True)
        comp: dict[tuple[str, bool, bool, int], dict[str, Any]] = {}
        runs: dict[tuple[str, bool, bool, int], dict[str, Any]] = {}
        settings = [(bf16, compiled, a.batch) for bf16, compiled in variants]
        swept = [(True, False, bs) for bs in sweep]
        settings_run = settings + (swept if a.sweep_runs else [])
        settings += swept
        for m in models:
            rows = compute_rows(m, path, a.tile, settings, a.batches, a.rounds, a.budget_s)
            comp.update({(m, *k): v for k, v in rows.items()})
        # whole runs: every setting once per round, rounds interleaved, best kept
        for _ in range(0 if a.no_runs else a.run_rounds):
            for m in models:
                for bf16, compiled, bs in settings_run:
                    key = (m, bf16, compiled, bs)
                    if over_budget(
                        a.budget_s, f"whole run {m} bf16={bf16} compiled={compiled} b{bs}"
                    ):
                        continue
                    row = whole_run(
                        m,
                        path,
                        a.tile,
                        bs,
                        bf16,
                        compiled,
                        a.workers,
                        tmp / f"r{len(RESULTS['runs'])}",
                    )
                    best = runs.get(key)
                    if best is None or (row["steady_tiles_per_s"] or 0) > (
                        best["steady_tiles_per_s"] or 0
                    ):
                        runs[key] = row
    if a.agreement and not over_budget(a.budget_s, "agreement"):
        agreement(128)

    def rate(table: dict[Any, dict[str, Any]], key: Any, field: str) -> float | None:
        row = table.get(key)
        return row.get(field) if row else None

    print("\nratios (rows of this run)")
    b = a.batch
    for m in models:
        for label, table, field in (
            ("compute", comp, "tiles_per_s"),
            ("whole run", runs, "steady_tiles_per_s"),
        ):
            ratio(
                f"{m} {label}: bf16+cl / fp32 (eager)",
                rate(table, (m, True, False, b), field),
                rate(table, (m, False, False, b), field),
            )
            for bf16 in (True, False):
                ratio(
                    f"{m} {label}: compiled / eager ({'bf16' if bf16 else 'fp32'})",
                    rate(table, (m, bf16, True, b), field),
                    rate(table, (m, bf16, False, b), field),
                )
        for key in sorted(k for k in runs if k[0] == m):
            ratio(
                f"{m} whole run / compute alone, bf16={key[1]} compiled={key[2]} b{key[3]}",
                runs[key]["steady_tiles_per_s"],
                comp[key]["tiles_per_s"],
            )
    RESULTS["machine"]["load_after"] = os.getloadavg()
    RESULTS["elapsed_s"] = time.time() - T0
    print(f"elapsed {RESULTS['elapsed_s']:.0f} s; skipped: {len(RESULTS['skipped'])}")
    if a.out:
        a.out.write_text(json.dumps(RESULTS, indent=2))
        print(f"results: {a.out}")


if __name__ == "__main__":
    main()
