"""Tests of the run monitor, GPU mapping, report and hint (CPU only, fake NVML backend)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import run_mgpr_inprocess
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from mgpr.errors import ConfigError
from mgpr.monitor import callback
from mgpr.monitor.callback import NO_GPU_MESSAGE, RunMonitor
from mgpr.monitor.hint import bottleneck_hint
from mgpr.monitor.nvml import Nvml, open_nvml
from mgpr.monitor.part import CudaProps
from mgpr.monitor.profiler import make_profiler
from mgpr.monitor.progress import Progress, progress_line
from mgpr.monitor.report import _rank_row as build_report_row
from mgpr.monitor.report import build_report, format_report, wait_for_parts
from mgpr.monitor.sampler import DeviceSampler, Sample, SampleBuffer

GIB = 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeNvmlError(Exception):
    """What the fake raises, as pynvml raises ``NVMLError`` subclasses."""


class FakeNvmlModule:
    """A pynvml-like module: devices found by uuid, scripted readings (cycled).

    ``devices[i]`` is physical GPU ``i``; ``mig`` maps MIG uuids to instances whose ``parent``
    is the index of their physical GPU. Names come back as bytes, as older pynvml returns them.
    """

    NVMLError = FakeNvmlError

    def __init__(self, devices: list[dict[str, Any]], mig: dict[str, dict[str, Any]] | None = None):
        self.devices = devices
        self.mig = mig or {}
        self.calls: dict[str, int] = {}
        self.state = "new"
        self.init_error: Exception | None = None

    def _next(self, dev: dict[str, Any], key: str) -> Any:
        values = dev[key]
        i = self.calls.get(dev["uuid"] + key, 0)
        self.calls[dev["uuid"] + key] = i + 1
        value = values[i % len(values)]
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.state = "open"

    def nvmlShutdown(self) -> None:
        self.state = "closed"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> dict[str, Any]:
        for dev in [*self.devices, *self.mig.values()]:
            if dev["uuid"] == uuid:
                return dev
        raise FakeNvmlError("NVML_ERROR_NOT_FOUND")

    def nvmlDeviceIsMigDeviceHandle(self, h: dict[str, Any]) -> bool:
        return bool(h.get("is_mig"))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: dict[str, Any]) -> dict[str, Any]:
        return self.devices[h["parent"]]

    def nvmlDeviceGetIndex(self, h: dict[str, Any]) -> int:
        return next(i for i, dev in enumerate(self.devices) if dev is h)

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:
        return str(h["name"]).encode()

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return str(h["uuid"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(used=int(self._next(h, "used")), total=int(h["total"]))

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> SimpleNamespace:
        if h.get("is_mig"):
            raise AssertionError("utilisation must not be read for a MIG instance")
        return SimpleNamespace(gpu=int(self._next(h, "util")))


def _uuid(i: int) -> str:
    return f"GPU-{i:x}{i:x}{i:x}{i:x}beef-0000-1111-2222-{i:012x}"


def _torch_uuid(i: int) -> str:
    """The uuid of physical GPU ``i`` as torch prints it: no ``GPU-`` prefix."""
    return _uuid(i).removeprefix("GPU-")


def _fake(n: int = 8, **per_device: Any) -> FakeNvmlModule:
    devices = [
        {
            "uuid": _uuid(i),
            "name": f"Fake GPU {i}",
            "total": 80 * GIB,
            "used": per_device.get("used", [GIB]),
            "util": per_device.get("util", [50]),
        }
        for i in range(n)
    ]
    return FakeNvmlModule(devices)


def _fake_mig(module: FakeNvmlModule, parent: int) -> str:
    """Add a MIG instance on physical GPU ``parent``; returns its uuid as torch prints it."""
    torch_uuid = "0d4c1111-2222-3333-4444-555566667777"
    module.mig["MIG-" + torch_uuid] = {
        "uuid": "MIG-" + torch_uuid,
        "name": "Fake GPU MIG 1g.10gb",
        "total": 10 * GIB,
        "used": [2 * GIB],
        "is_mig": True,
        "parent": parent,
    }
    return torch_uuid


# ------------------------------------------------------------------------------------ NVML
def test_nvml_opens_the_device_torch_names() -> None:
    """torch's uuid (no prefix) finds physical GPU 5, whatever CUDA's ordinal for it."""
    gpu = Nvml(_fake()).gpu(_torch_uuid(5))
    assert (gpu.physical_index, gpu.uuid, gpu.name, gpu.mig) == (5, _uuid(5), "Fake GPU 5", False)
    assert gpu.memory_total_bytes == 80 * GIB
    assert Nvml(_fake()).gpu(_uuid(3)).physical_index == 3  # a prefixed uuid is kept as is


def test_nvml_unknown_uuid_raises_the_nvml_error() -> None:
    with pytest.raises(FakeNvmlError, match="NOT_FOUND"):
        Nvml(_fake()).gpu("ffffffff-0000-0000-0000-000000000000")


def test_nvml_open_and_close() -> None:
    module = _fake()
    nvml, reason = open_nvml(module)
    assert nvml is not None and reason == "" and module.state == "open"
    nvml.close()
    assert module.state == "closed"
    module.init_error = FakeNvmlError("NVML_ERROR_LIBRARY_NOT_FOUND")
    assert open_nvml(module) == (None, "FakeNvmlError: NVML_ERROR_LIBRARY_NOT_FOUND")


def test_nvml_mig_reports_memory_only() -> None:
    module = _fake()
    gpu = Nvml(module).gpu(_fake_mig(module, parent=2))
    assert gpu.mig and gpu.physical_index == 2 and gpu.memory_total_bytes == 10 * GIB
    assert gpu.uuid.startswith("MIG-")
    sampler = DeviceSampler(gpu=gpu, nvml=Nvml(module), torch_device_index=None, interval_s=0.5)
    sample = sampler.sample_once()  # would raise from FakeNvmlModule.nvmlDeviceGetUtilizationRates
    assert sample.mem_used_bytes == 2 * GIB and sample.util_pct is None


# ------------------------------------------------------------------------------------ sampler
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sampler_exact_average_and_peak() -> None:
    module = _fake(used=[1 * GIB, 2 * GIB, 3 * GIB, 4 * GIB], util=[10, 20, 90, 40])
    nvml = Nvml(module)
    gpu = nvml.gpu(_torch_uuid(5))
    module.calls.clear()  # opening read the memory total once; start the script afresh
    clock = FakeClock()
    sampler = DeviceSampler(
        gpu=gpu, nvml=nvml, torch_device_index=None, interval_s=0.5, clock=clock, t0=100.0
    )
    for _ in range(4):
        sampler.sample_once()
        clock.now += 0.5
    stats = sampler.buffer.stats()
    assert stats["samples"] == 4
    assert stats["mem_used_bytes_avg"] == 2.5 * GIB and stats["mem_used_bytes_peak"] == 4 * GIB
    assert stats["util_pct_avg"] == 40.0 and stats["util_pct_peak"] == 90.0
    assert stats["rss_bytes_avg"] is not None and stats["rss_bytes_avg"] > 0
    assert stats["torch_allocated_bytes_avg"] is None  # no CUDA device given
    cols = sampler.buffer.columns()
    assert cols["t_s"] == [0.0, 0.5, 1.0, 1.5]
    assert cols["util_pct"] == [10.0, 20.0, 90.0, 40.0]
    assert cols["mem_used_bytes"] == [GIB, 2 * GIB, 3 * GIB, 4 * GIB]
    assert module.calls == {_uuid(5) + "used": 4, _uuid(5) + "util": 4}  # physical 5 only


def test_sampler_nvml_error_warns_once_and_continues(caplog: pytest.LogCaptureFixture) -> None:
    nvml = Nvml(_fake(util=[RuntimeError("NVML_ERROR_GPU_IS_LOST")]))
    gpu = nvml.gpu(_torch_uuid(0))
    sampler = DeviceSampler(
        gpu=gpu, nvml=nvml, torch_device_index=None, interval_s=0.5, log_prefix="[rank: 0] "
    )
    with caplog.at_level(logging.WARNING, logger="mgpr.monitor.sampler"):
        samples = [sampler.sample_once() for _ in range(3)]
    assert all(s.util_pct is None and s.mem_used_bytes == GIB for s in samples)
    warnings = [r for r in caplog.records if "NVML utilisation" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("[rank: 0] ")


def test_sampler_thread_starts_and_stops() -> None:
    sampler = DeviceSampler(gpu=None, nvml=None, torch_device_index=None, interval_s=0.01)
    sampler.start()
    import time

    deadline = time.monotonic() + 20.0
    while sampler.buffer.seen < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert not sampler.running
    assert sampler.buffer.seen >= 5
    seen = sampler.buffer.seen
    time.sleep(0.05)
    assert sampler.buffer.seen == seen  # really stopped


def test_sample_buffer_is_bounded_and_even() -> None:
    buf = SampleBuffer(max_samples=10)
    for i in range(1000):
        buf.add(Sample(t_s=float(i), rss_bytes=i))
    assert len(buf) <= 10
    t = buf.columns()["t_s"]
    steps = {b - a for a, b in zip(t, t[1:], strict=False)}
    assert len(steps) == 1 and t[0] == 0.0  # evenly thinned from the start
    stats = buf.stats()
    assert stats["samples"] == 1000
    assert stats["rss_bytes_avg"] == 499.5 and stats["rss_bytes_peak"] == 999


def test_sampler_rejects_bad_interval() -> None:
    with pytest.raises(ConfigError):
        DeviceSampler(gpu=None, nvml=None, torch_device_index=None, interval_s=0)
    with pytest.raises(ConfigError):
        RunMonitor(Path("x"), interval_s=-1)


# ------------------------------------------------------------------------------------ hint
HINT_ARGS = {"workers": 2, "cpus": 16, "batch_size": 16, "precision": "32-true"}


def test_hint_data_bound() -> None:
    hint = bottleneck_hint(0.62, 35.0, {"write": 0.05}, **HINT_ARGS)
    assert hint.startswith("data-bound: ranks waited 62% of the time for tiles; raise workers")
    assert "now 2" in hint and "16 CPUs" in hint


def test_hint_data_bound_without_spare_cpus() -> None:
    hint = bottleneck_hint(0.5, 35.0, {}, workers=7, cpus=8, batch_size=16, precision="32-true")
    assert hint.startswith("data-bound") and "--cpus-per-task" in hint


def test_hint_of_fake_data_names_its_delay_not_tiled_input() -> None:
    """use_fake_data with dummy_dataset_delay: the wait is the delay; there is no input to
    convert with gdal_translate (the hint said so)."""
    hint = bottleneck_hint(
        0.8, 10.0, {}, workers=7, cpus=8, batch_size=16, precision="32-true", fake_delay_s=0.01
    )
    assert hint.startswith("data-bound: ranks waited 80%")
    assert "dummy_dataset_delay=0.01 s per tile" in hint and "gdal_translate" not in hint


def test_hint_compute_bound() -> None:
    hint = bottleneck_hint(0.03, 97.0, {"write": 0.02}, **HINT_ARGS)
    assert hint.startswith("compute-bound: GPUs 97% busy") and "bf16" in hint
    bf16 = bottleneck_hint(0.03, 97.0, {}, **{**HINT_ARGS, "precision": "bf16-mixed"})
    assert "already bf16-mixed" in bf16


def test_hint_write_bound_beats_smaller_data_wait() -> None:
    hint = bottleneck_hint(0.26, 40.0, {"write": 0.45, "postprocess": 0.1}, **HINT_ARGS)
    assert hint.startswith("write-bound: writing results took 45% of the time")
    post = bottleneck_hint(0.1, 40.0, {"postprocess": 0.3}, **HINT_ARGS)
    assert post.startswith("postprocess-bound")
    assert "raise score_threshold or lower max_detections" in post  # the keys that help


def test_hint_cpu_underused_balanced_unknown() -> None:
    cpu = bottleneck_hint(0.05, None, {"compute": 0.9}, **HINT_ARGS, cpu_run=True)
    assert cpu.startswith("cpu run:") and "compute 90%" in cpu
    assert bottleneck_hint(0.05, 30.0, {}, **HINT_ARGS).startswith("underused:")
    assert bottleneck_hint(0.05, 70.0, {}, **HINT_ARGS).startswith("balanced:")
    assert bottleneck_hint(0.05, None, {}, **HINT_ARGS).startswith("no GPU utilisation measured")


# ------------------------------------------------------------------------------------ report
def _part(rank: int, *, util: list[float], used_gib: list[float], wait: float) -> dict[str, Any]:
    n = len(used_gib)
    return {
        "schema": "mgpr.report_part/1",
        "status": "finished",
        "error": None,
        "hostname": f"node{rank // 2:02d}",
        "global_rank": rank,
        "local_rank": rank % 2,
        "node_rank": rank // 2,
        "world_size": 3,
        "device": f"cuda:{rank % 2}",
        "monitor_source": "nvml",
        "gpu": {
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": _uuid(rank),
            "physical_index": rank % 2,
            "memory_total_bytes": 80 * GIB,
            "mig": False,
        },
        "host_memory_total_bytes": 512 * GIB,
        "interval_s": 0.5,
        "wall_s": 100.0,
        "data_wait_s": wait,
        "compute_s": 100.0 - wait - 10.0,
        "stages_s": {"write": 6.0, "postprocess": 2.0},
        "stages_background_s": {},
        "batches": 50,
        "tiles": 800,
        "tiles_per_s": 8.0,
        "cuda_synchronized": True,
        "stats": {
            "samples": n,
            "mem_used_bytes_avg": sum(used_gib) / n * GIB,
            "mem_used_bytes_peak": max(used_gib) * GIB,
            "util_pct_avg": sum(util) / n,
            "util_pct_peak": max(util),
            "torch_max_allocated_bytes_peak": 5 * GIB,
            "rss_bytes_avg": 3 * GIB,
            "rss_bytes_peak": 4 * GIB,
        },
        "samples": {
            "t_s": [0.5 * i for i in range(n)],
            "mem_used_bytes": [g * GIB for g in used_gib],
            "util_pct": util,
            "torch_allocated_bytes": [GIB] * n,
            "torch_reserved_bytes": [2 * GIB] * n,
            "torch_max_allocated_bytes": [5 * GIB] * n,
            "rss_bytes": [3 * GIB] * n,
        },
    }


def _write_parts(run_dir: Path, parts: list[dict[str, Any]]) -> None:
    (run_dir / "report_parts").mkdir(parents=True)
    for part in parts:
        path = run_dir / "report_parts" / f"rank{part['global_rank']}.json"
        path.write_text(json.dumps(part))


@pytest.fixture
def two_of_three(tmp_path: Path) -> Path:
    import math

    n = 200
    used0 = [8 + 4 * math.sin(i / 15) for i in range(n)]
    used1 = [10 + 0.01 * i for i in range(n)]
    util0 = [95.0 if i % 10 else 40.0 for i in range(n)]
    util1 = [60 + 30 * math.sin(i / 7) for i in range(n)]
    _write_parts(
        tmp_path,
        [
            _part(0, util=util0, used_gib=used0, wait=5.0),
            _part(1, util=util1, used_gib=used1, wait=30.0),
        ],
    )
    return tmp_path


def test_report_schema_and_missing_rank(two_of_three: Path) -> None:
    context = {"workers": 2, "batch_size": 16, "precision": "32-true", "cpus_per_task": 16}
    report = build_report(two_of_three, 3, context)
    on_disk = json.loads((two_of_three / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    expected_top = {
        "schema": str,
        "created_unix_s": float,
        "world_size": int,
        "ranks_reported": list,
        "missing_ranks": list,
        "failed_ranks": list,
        "interrupted_ranks": list,
        "unreadable_parts": list,
        "context": dict,
        "ranks": list,
        "gpus": list,
        "totals": dict,
        "phases": (dict, type(None)),  # null: the caller gave no command start
        "hint": str,
        "plot": str,
    }
    assert set(report) == set(expected_top)
    for key, typ in expected_top.items():
        assert isinstance(report[key], typ), key
    assert report["missing_ranks"] == [2] and report["ranks_reported"] == [0, 1]
    row_types = {
        "global_rank": int,
        "hostname": str,
        "device": str,
        "gpu_name": str,
        "memory_kind": str,
        "mem_total_gib": float,
        "mem_avg_gib": float,
        "mem_peak_gib": float,
        "mem_avg_pct": float,
        "mem_peak_pct": float,
        "util_avg_pct": float,
        "batches": int,
        "tiles": int,
        "wall_s": float,
        "tiles_per_s": float,
        "data_wait_share": float,
        "compute_share": float,
        "stage_shares": dict,
    }
    for row in report["ranks"]:
        for key, typ in row_types.items():
            assert isinstance(row[key], typ), key
    r1 = report["ranks"][1]
    assert r1["mem_total_gib"] == 80.0 and r1["memory_kind"] == "gpu"
    assert r1["mem_peak_gib"] == pytest.approx(11.99, abs=1e-3)
    assert r1["mem_peak_pct"] == pytest.approx(15.0, abs=0.1)
    assert r1["data_wait_share"] == 0.3 and r1["stage_shares"]["write"] == 0.06
    totals = report["totals"]
    assert totals["tiles"] == 1600 and totals["wall_s"] == 100.0 and totals["tiles_per_s"] == 16.0
    assert totals["data_wait_share"] == 0.175 and totals["nodes"] == 1
    text = format_report(report)
    assert "MISSING: no report part from rank(s) 2" in text
    assert text.count("NVIDIA H100") == 2 and "hint: " in text
    assert "1600 tiles in 100.0 s = 16.0 tiles/s" in text


def test_report_two_ranks_on_one_gpu_count_once(tmp_path: Path) -> None:
    """NVML readings are per device: ranks 0 and 1 share GPU 0, rank 2 has GPU 1 to itself."""
    shared = [_part(r, util=[90.0], used_gib=[20.0], wait=1.0) for r in (0, 1)]
    alone = _part(2, util=[30.0], used_gib=[5.0], wait=1.0)
    for part in shared:
        part["hostname"], part["gpu"]["uuid"], part["gpu"]["physical_index"] = "n1", _uuid(0), 0
    alone["hostname"], alone["gpu"]["uuid"], alone["gpu"]["physical_index"] = "n1", _uuid(1), 1
    _write_parts(tmp_path, [*shared, alone])
    report = build_report(tmp_path, 3, {})
    assert [(g["gpu_uuid"], g["ranks"]) for g in report["gpus"]] == [
        (_uuid(0), [0, 1]),
        (_uuid(1), [2]),
    ]
    assert report["gpus"][0]["mem_peak_gib"] == 20.0 and report["gpus"][0]["util_avg_pct"] == 90.0
    assert report["totals"]["gpus"] == 2
    assert report["totals"]["gpu_util_avg_pct"] == 60.0  # (90 + 30) / 2, not (90 + 90 + 30) / 3


def test_report_plot_is_png(two_of_three: Path) -> None:
    report = build_report(two_of_three, 3, {"workers": 2, "batch_size": 16, "precision": "32"})
    png = two_of_three / report["plot"]
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    shutil.copy(png, "/tmp/mgpr_report_example.png")


def test_report_unreadable_and_failed_parts(tmp_path: Path) -> None:
    part = _part(0, util=[50.0], used_gib=[1.0], wait=1.0)
    part["status"], part["error"] = "failed", "RuntimeError: CUDA out of memory"
    _write_parts(tmp_path, [part])
    (tmp_path / "report_parts" / "rank1.json").write_text("{truncated")
    report = build_report(tmp_path, 2, {})
    assert report["missing_ranks"] == [1] and report["unreadable_parts"] == ["rank1.json"]
    assert report["failed_ranks"] == [0]
    assert "FAILED: RuntimeError" in format_report(report)


def test_report_without_any_part(tmp_path: Path) -> None:
    report = build_report(tmp_path, 2, {})
    assert report["missing_ranks"] == [0, 1] and report["plot"] is None
    assert "no rank wrote a report part" in report["hint"]


# ------------------------------------------------------------------------------------ progress
def test_progress_line_format() -> None:
    elapsed = 1234 / 41.2
    assert progress_line(1234, 5000, elapsed) == (
        "progress: 1234/5000 tiles (24.7%), 41.2 tiles/s, ETA 00:01:31"
    )
    assert progress_line(10, None, 2.0) == "progress: 10 tiles, 5.0 tiles/s"
    assert progress_line(0, 10, 0.0).endswith("ETA --:--:--")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_tty_and_log(caplog: pytest.LogCaptureFixture) -> None:
    stream = _Tty()
    bar = Progress(t0=0.0, total=100, source=lambda: 50, tty=True, log_every_s=30, stream=stream)
    bar.tick(10.0)
    bar.close(20.0)
    out = stream.getvalue()
    assert out.startswith("\r[##########..........] 50/100 tiles (50.0%), 5.0 tiles/s")
    assert out.endswith("\n") and out.count("\r") == 2
    log = Progress(t0=0.0, total=100, source=lambda: 25, tty=False, log_every_s=30, stream=stream)
    with caplog.at_level(logging.INFO, logger="mgpr.monitor.progress"):
        log.tick(10.0)  # not due yet
        log.tick(30.0)
        log.tick(31.0)  # throttled
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["progress: 25/100 tiles (25.0%), 0.8 tiles/s, ETA 00:01:30"]


# ------------------------------------------------------------------------------------ profiler
def test_profiler_simple_writes_its_report_into_the_run_dir(
    make_image, tmp_path: Path, capsys
) -> None:
    """profiler=simple printed its report through Lightning's logger, which mgpr's logging
    leaves out: the run ended with no profile anywhere."""
    img = make_image(width=256, height=256, objects=2)
    run = tmp_path / "run"
    args = (f"input_path={img.path}", "model=reference", "tile_size=128", "workers=0")
    assert run_mgpr_inprocess(*args, "profiler=simple", f"output_dir={run}") == 0
    report = run / "predict-simple-profile.txt"
    assert "Profiler Report" in report.read_text() and "predict_step" in report.read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["profiles"] == [str(report)]
    assert f"  profile      {report}" in capsys.readouterr().out


def test_make_profiler(tmp_path: Path) -> None:
    from lightning.pytorch.profilers import PyTorchProfiler

    assert make_profiler(None, tmp_path) is None and make_profiler("none", tmp_path) is None
    from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler

    assert isinstance(make_profiler("simple", tmp_path), SimpleProfiler)
    assert isinstance(make_profiler("Advanced", tmp_path), AdvancedProfiler)
    assert make_profiler("simple", tmp_path).filename == "simple-profile"
    assert make_profiler("simple", tmp_path, node=1).filename == "simple-profile-node1"
    prof = make_profiler("pytorch", tmp_path)
    assert isinstance(prof, PyTorchProfiler) and Path(prof.dirpath) == tmp_path
    with pytest.raises(ConfigError, match="simple, advanced, pytorch"):
        make_profiler("nvprof", tmp_path)


# ------------------------------------------------------------------------------------ lightning
class TileDataset(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = torch.full((3, 8, 8), i % 256, dtype=torch.uint8)
        return {"image": image, "index": torch.tensor(i, dtype=torch.int64)}


class TinyModel(LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fail_at = fail_at

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        out = self.conv(batch["image"].float() / 255.0).mean(dim=(1, 2, 3))
        monitor = next(c for c in self.trainer.callbacks if isinstance(c, RunMonitor))
        start = time.perf_counter()
        out = out.cpu()
        monitor.record_stage("postprocess", time.perf_counter() - start)
        return out


def _trainer(monitor: RunMonitor, tmp_path: Path, **kw: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor],
        **kw,
    )


def test_lightning_cpu_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor = RunMonitor(
        tmp_path, interval_s=0.02, total_tiles=10, progress=False, progress_source=lambda: 10
    )
    loader = DataLoader(TileDataset(10), batch_size=4)
    with caplog.at_level(logging.INFO, logger="mgpr"):
        _trainer(monitor, tmp_path).predict(TinyModel(), loader, return_predictions=False)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(NO_GPU_MESSAGE) == 1
    assert any(m.startswith("progress: 10/10 tiles (100.0%)") for m in messages)
    part = json.loads((tmp_path / "report_parts" / "rank0.json").read_text())
    assert (part["batches"], part["tiles"], part["status"]) == (3, 10, "finished")
    assert (part["device"], part["monitor_source"], part["gpu"]) == ("cpu", "host", None)
    assert (part["global_rank"], part["local_rank"], part["world_size"]) == (0, 0, 1)
    assert part["stats"]["samples"] >= 1 and part["stats"]["rss_bytes_peak"] > 0
    assert part["stages_s"]["postprocess"] > 0
    assert part["steady_tiles_per_s"] > 0  # 6 tiles after the first batch of 4
    spent = part["data_wait_s"] + part["compute_s"] + sum(part["stages_s"].values())
    assert 0 < spent <= part["wall_s"] + 1e-6
    assert not monitor._sampler.running  # type: ignore[union-attr]
    report = build_report(
        tmp_path, 1, {"workers": 0, "batch_size": 4, "precision": "32-true", "cpus_per_task": 2}
    )
    assert report["hint"].startswith("cpu run:")
    assert report["ranks"][0]["memory_kind"] == "host_rss" and report["totals"]["tiles"] == 10


def test_steady_rate_leaves_out_the_first_batch(tmp_path: Path) -> None:
    """First batch 4 tiles in 10 s (start-up), then 2 batches of 4 tiles in 1 s each."""
    now = [0.0]
    monitor = RunMonitor(tmp_path, interval_s=1.0, progress=False)
    monitor._clock = lambda: now[0]
    monitor.t0 = 0.0
    for end in (10.0, 11.0, 12.0):
        monitor.on_predict_batch_start(None, None, {"index": [0] * 4}, 0)  # type: ignore[arg-type]
        now[0] = end
        monitor.on_predict_batch_end(None, None, None, {"index": [0] * 4}, 0)  # type: ignore[arg-type]
    part = monitor.part()
    assert part["tiles_per_s"] == pytest.approx(12 / 12.0)
    assert part["steady_tiles_per_s"] == pytest.approx(8 / 2.0)
    row = build_report_row(part)
    assert row["steady_tiles_per_s"] == 4.0


def test_model_tiles_leave_out_nodata_and_failed_tiles(tmp_path: Path) -> None:
    """Batches of 4 tiles with statuses: only status OK (0) reached the model; a batch without
    statuses (fake data) counts every tile. The part, the report's row, totals and text."""
    import numpy as np

    from mgpr.data.dataset import STATUS_OK

    now = [0.0]
    monitor = RunMonitor(tmp_path, interval_s=1.0, progress=False)
    monitor._clock = lambda: now[0]
    monitor.t0 = 0.0
    ok, other = STATUS_OK, STATUS_OK + 1
    batches = [
        {"index": [0] * 4, "status": np.array([ok, other, other, other])},
        {"index": [0] * 4, "status": np.array([other] * 4)},
        {"index": [0] * 4},
    ]
    for i, batch in enumerate(batches):
        monitor.on_predict_batch_start(None, None, batch, i)  # type: ignore[arg-type]
        now[0] += 1.0
        monitor.on_predict_batch_end(None, None, None, batch, i)  # type: ignore[arg-type]
    part = monitor.part()
    assert (part["tiles"], part["model_tiles"]) == (12, 5)
    assert part["model_tiles_per_s"] == pytest.approx(5 / 3.0)
    assert build_report_row(part)["model_tiles"] == 5
    (tmp_path / "report_parts").mkdir(exist_ok=True)
    (tmp_path / "report_parts" / "rank0.json").write_text(json.dumps(part))
    report = build_report(tmp_path, 1, {"workers": 0, "batch_size": 4, "precision": "32"})
    assert (report["totals"]["model_tiles"], report["totals"]["model_tiles_per_s"]) == (5, 1.667)
    assert "12 tiles in 3.0 s = 4.0 tiles/s (5 reached the model: 1.7/s)" in format_report(report)
    del part["model_tiles"]  # a part of an older mgpr: every tile counted
    assert build_report_row(part)["model_tiles"] == 12


def test_lightning_failure_writes_failed_part(tmp_path: Path) -> None:
    monitor = RunMonitor(tmp_path, interval_s=0.05, progress=False)
    loader = DataLoader(TileDataset(10), batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(monitor, tmp_path).predict(TinyModel(fail_at=1), loader)
    part = json.loads((tmp_path / "report_parts" / "rank0.json").read_text())
    assert part["status"] == "failed" and part["error"] == "RuntimeError: boom"
    assert (part["batches"], part["tiles"]) == (1, 4)


def test_report_modules_import_light() -> None:
    code = (
        "import sys, mgpr.monitor.report, mgpr.monitor.sampler, mgpr.monitor.nvml; "
        "bad = [m for m in ('lightning', 'torch', 'matplotlib', 'pynvml') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_lightning_two_rank_gloo(tmp_path: Path) -> None:
    monitor = RunMonitor(tmp_path, interval_s=0.05, progress=False)
    loader = DataLoader(TileDataset(12), batch_size=2)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor],
    )
    trainer.predict(TinyModel(), loader, return_predictions=False)
    report = build_report(tmp_path, 2, {"workers": 0, "batch_size": 2, "precision": "32-true"})
    assert report["missing_ranks"] == []
    assert [r["global_rank"] for r in report["ranks"]] == [0, 1]
    # Lightning's DistributedSampler splits 12 tiles over 2 ranks
    assert report["totals"]["tiles"] == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lightning_gpu_run(tmp_path: Path) -> None:
    monitor = RunMonitor(tmp_path, interval_s=0.05, progress=False)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[monitor],
    )
    trainer.predict(TinyModel(), DataLoader(TileDataset(64), batch_size=8))
    part = json.loads((tmp_path / "report_parts" / "rank0.json").read_text())
    assert part["device"].startswith("cuda:") and part["tiles"] == 64
    assert part["gpu"] is not None and part["gpu"]["memory_total_bytes"] > 0
    assert part["stats"]["torch_max_allocated_bytes_peak"] > 0
    if part["monitor_source"] == "nvml":
        assert part["gpu"]["uuid"].startswith("GPU-") and part["stats"]["util_pct_avg"] is not None


def test_run_monitor_pickles_settings_only(tmp_path: Path) -> None:
    import pickle

    monitor = RunMonitor(tmp_path, interval_s=0.2, total_tiles=5, nvml=Nvml(_fake()))
    monitor.record_stage("write", 1.0)
    clone = pickle.loads(pickle.dumps(monitor))
    assert (clone.run_dir, clone.interval_s, clone.total_tiles) == (tmp_path, 0.2, 5)
    assert clone.stages_s == {} and clone.nvml is None  # each rank opens its own


def _fake_cuda_trainer(global_rank: int, local_rank: int) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        global_rank=global_rank,
        local_rank=local_rank,
        node_rank=1,
        world_size=8,
        is_global_zero=global_rank == 0,
        strategy=SimpleNamespace(root_device=torch.device("cuda", local_rank)),
    )


def test_monitor_uses_local_device_not_global_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Global rank 6 on a second node is local cuda:1; NVML opens the GPU torch names for it."""
    asked: list[int] = []

    def props(index: int) -> CudaProps:
        asked.append(index)
        return CudaProps("Fake GPU 5", _torch_uuid(5), 80 * GIB)  # cuda:1 is physical GPU 5

    monkeypatch.setattr(callback, "cuda_props", props)
    monitor = RunMonitor(
        tmp_path,
        interval_s=0.01,
        nvml=Nvml(_fake(used=[3 * GIB], util=[80])),
        progress=False,
        sync_cuda=False,
    )
    trainer = _fake_cuda_trainer(global_rank=6, local_rank=1)
    monitor.setup(trainer, None, "predict")  # type: ignore[arg-type]
    monitor.on_predict_start(trainer, None)  # type: ignore[arg-type]
    batch = {"image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "index": torch.arange(4)}
    for i in range(2):
        monitor.on_predict_batch_start(trainer, None, batch, i)  # type: ignore[arg-type]
        monitor.on_predict_batch_end(trainer, None, None, batch, i)  # type: ignore[arg-type]
    monitor.on_predict_end(trainer, None)  # type: ignore[arg-type]
    assert asked == [1]
    part = json.loads((tmp_path / "report_parts" / "rank6.json").read_text())
    assert part["device"] == "cuda:1" and part["monitor_source"] == "nvml"
    assert part["gpu"]["physical_index"] == 5 and part["gpu"]["uuid"] == _uuid(5)
    assert (part["batches"], part["tiles"], part["node_rank"]) == (2, 8, 1)
    assert part["stats"]["util_pct_avg"] == 80.0
    assert part["stats"]["mem_used_bytes_peak"] == 3 * GIB


def test_monitor_device_unknown_to_nvml_reports_torch_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A uuid NVML does not know degrades to torch's figures, with one warning, never a crash."""
    uuid = "ffffffff-0000-0000-0000-000000000000"
    monkeypatch.setattr(callback, "cuda_props", lambda index: CudaProps("Fake GPU", uuid, GIB))
    monitor = RunMonitor(tmp_path, nvml=Nvml(_fake()))
    trainer = _fake_cuda_trainer(global_rank=1, local_rank=1)
    monitor.setup(trainer, None, "predict")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="mgpr"):
        monitor._open_device(trainer)  # type: ignore[arg-type]
    assert monitor._gpu is None and monitor._source == "torch"
    assert any("cannot find cuda:1 in NVML" in r.getMessage() for r in caplog.records)
    gpu = monitor.part()["gpu"]
    assert (gpu["uuid"], gpu["physical_index"], gpu["memory_total_bytes"]) == (
        "GPU-" + uuid,
        None,
        GIB,
    )


def test_monitor_mig_instance_is_memory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _fake()
    mig_uuid = _fake_mig(module, parent=4)
    monkeypatch.setattr(callback, "cuda_props", lambda index: CudaProps("MIG", mig_uuid, GIB))
    monitor = RunMonitor(tmp_path, nvml=Nvml(module))
    trainer = _fake_cuda_trainer(global_rank=0, local_rank=0)
    monitor.setup(trainer, None, "predict")  # type: ignore[arg-type]
    monitor._open_device(trainer)  # type: ignore[arg-type]
    assert monitor._source == "nvml-mig"
    gpu = monitor.part()["gpu"]
    assert gpu["mig"] and gpu["physical_index"] == 4 and gpu["uuid"] == "MIG-" + mig_uuid


def test_monitor_without_nvml_on_cuda_never_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(callback, "cuda_props", lambda index: None)
    monkeypatch.setattr(callback, "open_nvml", lambda: (None, "NVMLError: not found"))
    monitor = RunMonitor(tmp_path, interval_s=0.01, progress=False, sync_cuda=False)
    trainer = _fake_cuda_trainer(global_rank=0, local_rank=0)
    monitor.setup(trainer, None, "predict")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="mgpr"):
        monitor.on_predict_start(trainer, None)  # type: ignore[arg-type]
        monitor.on_predict_end(trainer, None)  # type: ignore[arg-type]
    part = json.loads((tmp_path / "report_parts" / "rank0.json").read_text())
    assert part["monitor_source"] == "torch" and part["status"] == "finished"
    assert any("NVML unavailable" in r.getMessage() for r in caplog.records)


def test_lightning_rank_without_tiles_writes_empty_part(tmp_path: Path) -> None:
    monitor = RunMonitor(tmp_path, interval_s=0.05, progress=False)
    loader = DataLoader(TileDataset(0), batch_size=4)
    _trainer(monitor, tmp_path).predict(TinyModel(), loader, return_predictions=False)
    part = json.loads((tmp_path / "report_parts" / "rank0.json").read_text())
    assert (part["status"], part["batches"], part["tiles"]) == ("finished", 0, 0)


def test_hint_suggests_tiling_only_for_striped_inputs() -> None:
    args = dict(
        gpu_util_avg=40.0, stage_shares={}, workers=3, cpus=4, batch_size=8, precision="bf16-mixed"
    )
    assert "TILED=YES" in bottleneck_hint(0.7, untiled_inputs=2, **args)
    assert "TILED=YES" not in bottleneck_hint(0.7, untiled_inputs=0, **args)
    assert "TILED=YES" in bottleneck_hint(0.7, untiled_inputs=None, **args)


def test_hint_says_when_most_tiles_were_nodata(two_of_three: Path) -> None:
    """A sparse mosaic: 611,235 of 611,524 tiles read and skipped; the bottleneck hint alone
    (data-bound) would send the user after CPUs for tiles the model never saw."""
    context = {"workers": 2, "batch_size": 16, "precision": "32"}
    plain = build_report(two_of_three, 3, {**context, "nodata_tiles": [10, 100]})["hint"]
    mostly = build_report(two_of_three, 3, {**context, "nodata_tiles": [611235, 611524]})["hint"]
    assert "nodata" not in plain
    assert mostly.startswith(plain)
    assert mostly.endswith(
        "; 611235 of the 611524 planned tiles (100%) are nodata: each is read, then skipped "
        "before the model, and tiles/s and the data wait count them"
    )


def test_report_sums_the_ranks_clip_counts(tmp_path: Path) -> None:
    """A rank without counts (raw values, uint8 by [0, 255], no tile) adds nothing; a part
    of an older mgpr (no floor) adds its counts and peak."""
    parts = [_part(r, util=[50.0], used_gib=[1.0], wait=1.0) for r in range(3)]
    parts[0]["values_clipped"] = {
        "below": 10,
        "above": 300,
        "values": 1000,
        "peak": 1.4,
        "floor": -0.1,
        "inputs": {"a.tif": [10, 0, 600, 0.8, -0.1], "b.tif": [0, 300, 400, 1.4, 0.3]},
    }
    parts[1]["values_clipped"] = {
        "below": 5,
        "above": 0,
        "values": 500,
        "peak": 0.9,
        "inputs": {"a.tif": [5, 0, 500, 0.9]},
    }
    parts[2]["values_clipped"] = None
    _write_parts(tmp_path, parts)
    report = build_report(tmp_path, 3, {})
    assert report["totals"]["values_clipped"] == {
        "below": 15,
        "above": 300,
        "values": 1500,
        "peak": 1.4,  # peaks: the max, not a sum
        "floor": -0.1,  # floors: the min
        "inputs": {"a.tif": [15, 0, 1100, 0.9, -0.1], "b.tif": [0, 300, 400, 1.4, 0.3]},
    }
    assert [r["values_clipped"] for r in report["ranks"]] == [  # rows: each rank's totals
        {"below": 10, "above": 300, "values": 1000, "peak": 1.4, "floor": -0.1},
        {"below": 5, "above": 0, "values": 500, "peak": 0.9, "floor": None},
        None,
    ]
    for part in parts:
        part["values_clipped"] = None
    _write_parts(tmp_path / "none", parts)
    assert build_report(tmp_path / "none", 3, {})["totals"]["values_clipped"] is None


def test_an_interrupted_rank_is_reported_as_such_not_as_failed(tmp_path: Path) -> None:
    stopped = _part(1, util=[90.0], used_gib=[9.0], wait=5.0)
    stopped.update(status="interrupted", error="RunInterrupted: SIGTERM")
    failed = _part(2, util=[90.0], used_gib=[9.0], wait=5.0)
    failed.update(status="failed", error="RuntimeError: CUDA error")
    _write_parts(tmp_path, [_part(0, util=[90.0], used_gib=[9.0], wait=5.0), stopped, failed])
    unfinished = "interrupted by SIGTERM: no merge ran"
    report = build_report(tmp_path, 3, {"unfinished": unfinished})
    assert (report["interrupted_ranks"], report["failed_ranks"]) == ([1], [2])
    text = format_report(report)
    assert "INTERRUPTED: RunInterrupted: SIGTERM" in text and "FAILED: RuntimeError" in text
    assert f"UNFINISHED: {unfinished}" in text


def test_waiting_for_parts_ends_when_every_rank_wrote_or_at_the_deadline(tmp_path: Path) -> None:
    now = [0.0]
    _write_parts(tmp_path, [_part(0, util=[90.0], used_gib=[9.0], wait=5.0)])

    def sleep(seconds: float) -> None:  # rank 1 writes its part 1.5 s into the wait
        now[0] += seconds
        if now[0] >= 1.5:
            (tmp_path / "report_parts" / "rank1.json").write_text("{}")

    absent = wait_for_parts(tmp_path, 2, 5.0, poll_s=0.5, clock=lambda: now[0], sleep=sleep)
    assert absent == [] and now[0] == 1.5
    absent = wait_for_parts(tmp_path, 3, 2.0, poll_s=0.5, clock=lambda: now[0], sleep=sleep)
    assert absent == [2] and now[0] == 3.5  # gave up 2 s later
