"""The pipeline on a real GPU (``pytest -m gpu``); skipped where torch sees no CUDA device.

Run on a GPU machine with ``uv run pytest -m gpu -s`` and record the printed summary block in the
README with the GPU's name.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import mgpr_cmd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(tmp_path: Path, *args: str) -> tuple[dict, dict, str]:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MGPR_"))}
    proc = subprocess.run(
        mgpr_cmd(*args, f"output_dir={run}", "progress=false"),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())
    return summary, report, proc.stdout


@pytest.mark.parametrize("model", ["resnet50", "fasterrcnn"])
def test_gpu_run_reports_real_gpu_figures(make_image, tmp_path: Path, model: str) -> None:
    img = make_image(width=4096, height=4096, objects=20, tile_size=512, overlap=64)
    summary, report, out = _run(
        tmp_path,
        f"input_path={img.path}",
        f"model={model}",
        "weights=none",
        "tile_size=512",
        "overlap=64",
        "batch_size=16",
        "workers=4",
        "accelerator=gpu",
        "gpus=1",
    )
    major, _ = torch.cuda.get_device_capability(0)
    assert summary["precision"] == ("bf16-mixed" if major >= 8 else "16-mixed")
    assert summary["tiles_predicted"] == summary["tiles_total"]
    rank = report["ranks"][0]
    assert rank["device"].startswith("cuda")
    assert rank["gpu_name"] and rank["memory_kind"] in ("gpu", "torch_reserved")
    assert rank["mem_peak_gib"] and rank["mem_peak_gib"] > 0
    if rank["memory_kind"] == "gpu":
        assert rank["util_avg_pct"] is not None
    assert "cuda" in out or rank["gpu_name"] in out


def test_pool_buffer_registered_as_pinned_memory() -> None:
    """cudaHostRegister on a shared-memory slot: pinned in place, copied by DMA, unpinned."""
    from mgpr.data.batch_pool import new_shared_bytes
    from mgpr.data.pinned import CudaHostRegistrar, PinnedSlots

    torch.cuda.set_device(0)
    buffer = new_shared_bytes(3 * 256 * 256 * 4)
    buffer.copy_(torch.arange(buffer.numel(), dtype=torch.int64).remainder(251).to(torch.uint8))
    storage = buffer.untyped_storage()
    assert not buffer.is_pinned()
    slots = PinnedSlots(CudaHostRegistrar())
    assert slots.ensure(0, storage.data_ptr(), storage.nbytes()), slots.failed
    assert buffer.is_pinned()  # the same memory, now page-locked: no copy was made
    on_gpu = buffer.view(4, 3, 256, 256).to("cuda:0", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu().flatten(), buffer)
    slots.release_all()
    assert not buffer.is_pinned()


def test_gpu_run_with_pinned_pool_and_compile(make_image, tmp_path: Path) -> None:
    """Workers + a GPU: the pinned pool (pin_memory=False), cuDNN autotuning, compile=true.

    The reference detector compiles in seconds (ResNet-50's compile is timed by the benchmark).
    """
    img = make_image(width=2048, height=2048, objects=10, tile_size=512, overlap=0)
    summary, report, _ = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=reference",
        "tile_size=512",
        "batch_size=5",  # 16 tiles: the last batch is short and padded
        "workers=2",
        "accelerator=gpu",
        "gpus=1",
        "compile=true",
    )
    assert summary["tiles_predicted"] == summary["tiles_total"] == 16
    assert summary["compile"]["used"] == "compiled", summary["compile"]


def test_reference_detector_bf16_demo_on_gpu(tmp_path: Path) -> None:
    """The quick start on a GPU in bf16: 40 of 40 planted objects, footprint error < 0.5 px."""
    summary, _, _ = _run(tmp_path, "precision=bf16-mixed", "accelerator=gpu", "gpus=1")
    assert summary["precision"] == "bf16-mixed"
    check = summary["demo_check"]
    assert check["planted"] == 40 and check["found"] == 40 and check["duplicates"] == 0
    assert check["max_footprint_error_px"] < 0.5


_CONTEXT_PROBE = """
import json, os, torch, pynvml
from mgpr.monitor.nvml import nvml_uuid_candidates
from mgpr.run.accel import rank_device_index
from mgpr.run.precision import resolve_precision
precision = resolve_precision("auto", "gpu")  # before any device is set, as in a rank
index = rank_device_index()
torch.cuda.set_device(index)
x = torch.ones(256, 256, device=f"cuda:{index}")
(x @ x).sum().item()
own = set(nvml_uuid_candidates(str(torch.cuda.get_device_properties(index).uuid)))
pynvml.nvmlInit()
seen = {}
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    pids = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    seen[uuid] = {"own": uuid in own, "here": os.getpid() in pids}
print(json.dumps({"index": index, "precision": precision, "gpus": seen}))
"""


def test_cuda_context_only_on_the_ranks_own_gpu() -> None:
    """A rank of the LAST GPU (LOCAL_RANK) resolves precision=auto and computes: NVML's process
    list must show this process on that GPU only (no context on GPU 0 for another rank)."""
    import sys

    local = torch.cuda.device_count() - 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MGPR_"))}
    env["LOCAL_RANK"] = str(local)
    proc = subprocess.run(
        [sys.executable, "-c", _CONTEXT_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    print(probe)
    assert probe["index"] == local
    gpus = probe["gpus"].values()
    own = [g for g in gpus if g["own"]]
    assert len(own) == 1
    if not own[0]["here"]:
        pytest.skip("NVML lists no process of this PID namespace (container): cannot check")
    assert [g for g in gpus if g["here"]] == own


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_rank_nccl_run(make_image, tmp_path: Path) -> None:
    """Two ranks on two GPUs (DDP, NCCL): every tile exactly once, both GPUs reported."""
    img = make_image(width=2048, height=2048, objects=20, tile_size=512, overlap=64)
    summary, report, _ = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=reference",
        "tile_size=512",
        "overlap=64",
        "batch_size=4",
        "workers=2",
        "accelerator=gpu",
        "gpus=2",
    )
    assert summary["world_size"] == 2 and summary["strategy"] == "DDPStrategy"
    assert summary["tiles_predicted"] + summary["tiles_skipped_nodata"] == summary["tiles_total"]
    assert summary["tiles_failed"] == 0
    devices = sorted(r["device"] for r in report["ranks"])
    assert devices == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    "spec",
    [
        {"nodata": "border", "nodata_value": 255},
        {"nodata": "rect", "nodata_mode": "mask", "hidden_objects": 2},
    ],
    ids=["white-nodata", "hidden-under-mask"],
)
def test_nodata_masked_on_gpu(make_image, tmp_path: Path, spec: dict) -> None:
    """The validity mask through the pinned pool to the GPU: filled there, boxes on it dropped."""
    from mgpr.run.finish import demo_check

    img = make_image(width=2048, height=1536, objects=12, tile_size=512, overlap=64, **spec)
    summary, _, _ = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=reference",
        "tile_size=512",
        "overlap=64",
        "batch_size=4",
        "workers=2",
        "accelerator=gpu",
        "gpus=1",
    )
    assert summary["tiles_predicted"] + summary["tiles_skipped_nodata"] == summary["tiles_total"]
    check = demo_check(tmp_path / "run" / "predictions.gpkg", img.truth_path)
    assert check["found"] == 12 and check["duplicates"] == 0, check
    assert check["unmatched_detections"] == 0, check


def test_clipped_values_counted_on_the_gpu(make_image, tmp_path: Path) -> None:
    """The clip tally on the device (nodata mask through the pinned pool, padded edge tiles):
    a uint8 range over 12-bit imagery clips every valid value above hi; its own range none."""
    img = make_image(
        width=1800, height=1300, objects=6, dtype="uint16", value_range=(0, 4095), nodata="border"
    )
    common = (f"input_path={img.path}", "model=reference", "tile_size=512", "batch_size=4")
    gpu = ("workers=2", "accelerator=gpu", "gpus=1")
    wrong, report, out = _run(tmp_path / "wrong", *common, *gpu, "value_range=[0,255]")
    assert wrong["values"]["clipped"]["above"] > 0.99, wrong["values"]
    assert report["totals"]["values_clipped"]["values"] == wrong["values"]["clipped"]["values"]
    assert "% above hi" in out
    right, _, _ = _run(tmp_path / "right", *common, *gpu, "value_range=[0,4095]")
    clipped = right["values"]["clipped"]
    assert clipped["below"] == clipped["above"] == 0.0 and clipped["values"] > 0, clipped
    cpu, _, _ = _run(
        tmp_path / "cpu", *common, "workers=0", "accelerator=cpu", "value_range=[0,4095]"
    )
    assert cpu["values"]["clipped"] == clipped  # the same counts as on the CPU


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet", "fcos", "ssdlite"])
def test_detector_boxes_exact_under_cuda_bf16(name: str) -> None:
    """CUDA bf16 autocast: float32 boxes on no 4 px step (torchvision's own forward: all on it);
    without autocast the same boxes as torchvision's forward."""
    from test_exact_boxes import SPEC, _on_step, single_stage_detector

    from mgpr.data.scaling import ValueScaler
    from mgpr.models import build_model
    from mgpr.models.detection import exact_detector_forward
    from mgpr.testimage import render_block

    torch.manual_seed(0)
    if name == "fasterrcnn":
        module = build_model("fasterrcnn", "none", tile_size=1024, score_threshold=0.0).module
    else:
        module = single_stage_detector(name, 1024)
    module = module.cuda().eval()
    strip = torch.from_numpy(render_block(SPEC, 0, 0, 64, 1024))[None].cuda()
    images = list(ValueScaler()(strip).unbind(0))
    with torch.inference_mode():
        exact = exact_detector_forward(module, images)[0]["boxes"]
        plain = module(images)[0]["boxes"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = exact_detector_forward(module, images)[0]["boxes"]
            theirs = module(images)[0]["boxes"]
    assert exact.shape == plain.shape and torch.allclose(exact, plain, atol=1e-3)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16

    def far(boxes: torch.Tensor) -> torch.Tensor:
        x = boxes[:, 0::2].float().cpu()
        return x[(x > 512) & (x < 1024)]

    assert far(ours).numel() >= 20 and far(theirs).numel() >= 20
    assert _on_step(far(theirs), 4.0) >= 0.9 and _on_step(far(ours), 4.0) < 0.05


def test_a_user_module_built_half_on_the_gpu_runs(make_image, tmp_path: Path, monkeypatch) -> None:
    """build() returning ``net.cuda().half()``: converted to float32 on the CPU, then moved."""
    (tmp_path / "mgpr_gpu_half.py").write_text(
        "import torch, torchvision\n"
        "def build(weights):\n"
        "    net = torchvision.models.resnet18(num_classes=4).cuda().half()\n"
        "    net.task = 'classification'\n"
        "    return net\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    img = make_image(width=1024, height=1024)
    summary, report, out = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=mgpr_gpu_half:build",
        "tile_size=256",
        "batch_size=8",
        "workers=2",
        "accelerator=gpu",
        "gpus=1",
    )
    assert summary["tiles_predicted"] == 16
    assert report["ranks"][0]["device"].startswith("cuda")
    assert "float16 -> float32" in (tmp_path / "run" / "logs" / "rank0.log").read_text()


def test_nonfinite_flags_stay_on_the_gpu_until_read() -> None:
    """The NaN check is one reduction on the device; the host reads it after postprocess."""
    from mgpr.models.base import nonfinite_tiles

    logits = torch.zeros((4, 21, 64, 64), device="cuda")
    logits[2, 3, 5, 5] = float("nan")
    flags = nonfinite_tiles({"out": logits}, 3)
    assert flags is not None and flags.device.type == "cuda"
    assert flags.cpu().tolist() == [False, False, True]


def test_custom_box_frame_checks_run_on_the_gpu_boxes() -> None:
    """Normalised boxes refused, boxes outside the tile counted: CUDA tensors, one sync."""
    from mgpr.errors import ModelError
    from mgpr.models.custom import _check_box_frame

    def dets(rows: list[list[float]]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor(rows, device="cuda")
        n = len(rows)
        return [{"boxes": boxes, "scores": torch.ones(n, device="cuda"), "labels": torch.ones(n)}]

    with pytest.raises(ModelError, match="normalised boxes"):
        _check_box_frame(dets([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.3, 0.9]]), "m", 64)
    assert _check_box_frame(dets([[1.0, 1.0, 9.0, 9.0], [70.0, 5.0, 90.0, 9.0]]), "m", 64) == (
        1,
        [70.0, 5.0, 90.0, 9.0],
    )
    assert _check_box_frame(dets([[1.0, 1.0, 9.0, 9.0]]), "m", 64) is None


def test_tta_d4_on_the_gpu_under_bf16(make_image, tmp_path: Path) -> None:
    """tta=d4 with deeplabv3 (random weights, fixed seed) on the GPU under bf16: the run
    finishes, says tta, and a quarter-turned tile gives the quarter-turned class map (the
    averaged network is equivariant; bf16 ties may flip a few pixels: at most 0.5 %)."""
    import numpy as np

    from mgpr.models import build_model
    from mgpr.models.tta import VIEWS, augmented_forward

    img = make_image(width=1024, height=1024, objects=10)
    summary, _report, out = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=deeplabv3",
        "weights=none",
        "tta=d4",
        "tile_size=512",
        "overlap=64",
        "precision=bf16-mixed",
    )
    assert summary["tta"] == {"mode": "d4", "views": 8} and "tta d4 (8 views)" in out
    torch.manual_seed(0)
    adapter = build_model("deeplabv3", "none", tile_size=256)
    adapter.module.to("cuda")
    x = torch.rand(2, 3, 256, 256, device="cuda")
    turn = VIEWS["d4"][2]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = augmented_forward(adapter, adapter.prepare(x.clone()), VIEWS["d4"])
        b = augmented_forward(adapter, adapter.prepare(turn.apply(x).contiguous()), VIEWS["d4"])
    ids_a = turn.apply(a.argmax(dim=1)).cpu().numpy()
    ids_b = b.argmax(dim=1).cpu().numpy()
    assert np.mean(ids_a != ids_b) <= 0.005


def test_reference_detector_with_tta_on_the_gpu_under_bf16(tmp_path: Path) -> None:
    """The quick start with tta=flips on the GPU in bf16: the views' boxes fused by NMS are
    still the planted footprints, each once."""
    summary, _report, _out = _run(tmp_path, "tta=flips", "precision=bf16-mixed")
    check = summary["demo_check"]
    assert (check["found"], check["missed"], check["duplicates"]) == (40, 0, 0)
    assert check["max_footprint_error_px"] < 0.5 and summary["tta"]["views"] == 4


def test_embeddings_on_the_gpu_bf16_and_compiled_agree_with_fp32(
    make_image, tmp_path: Path
) -> None:
    """resnet50-embed (seeded random weights) on the GPU: the run writes one 2048-float vector
    per tile; under bf16 (eager and compiled) each tile's vector points where fp32's does
    (cosine >= 0.999) and is a float32 mean, not a bf16 value."""
    import numpy as np
    import pyarrow.parquet as pq

    img = make_image(width=1024, height=1024, objects=10)

    def vectors(name: str, *more: str) -> dict[str, np.ndarray]:
        summary, _report, out = _run(
            tmp_path / name,
            f"input_path={img.path}",
            "model=resnet50-embed",
            "weights=none",
            "tile_size=256",
            "output_format=parquet",
            *more,
        )
        assert summary["embedding"]["dim"] == 2048 and summary["records"] == 16
        table = pq.read_table(tmp_path / name / "run" / "embeddings.parquet")
        flat = table["embedding"].combine_chunks().flatten().to_numpy()
        return dict(
            zip(table["tile_key"].to_pylist(), flat.reshape(table.num_rows, -1), strict=True)
        )

    fp32 = vectors("fp32", "precision=32")
    for name, more in (("bf16", ()), ("compiled", ("compile=true",))):
        got = vectors(name, "precision=bf16-mixed", *more)
        assert sorted(got) == sorted(fp32)
        for key, v in got.items():
            w = fp32[key]
            assert float(v @ w / (np.linalg.norm(v) * np.linalg.norm(w))) >= 0.999
        stacked = np.stack(list(got.values()))
        assert ((stacked.view(np.uint32) & 0xFFFF) == 0)[stacked != 0].mean() < 0.2


def test_maskrcnn_outlines_on_the_gpu_under_bf16(make_image, tmp_path: Path) -> None:
    """maskrcnn (seeded random weights, every box kept) on the GPU in bf16: masks come back as
    crops and the layer's geometries are traced outlines (not only 5-point boxes)."""
    import pyarrow.parquet as pq
    import shapely

    img = make_image(width=1024, height=1024, objects=10)
    summary, _report, _out = _run(
        tmp_path,
        f"input_path={img.path}",
        "model=maskrcnn",
        "weights=none",
        "score_threshold=0.0",
        "max_detections=20",
        "tile_size=512",
        "overlap=64",
        "precision=bf16-mixed",
        "output_format=parquet",
    )
    assert summary["tiles_predicted"] == summary["tiles_total"] and summary["records"] > 0
    table = pq.read_table(tmp_path / "run" / "detections.parquet")
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    assert (shapely.get_num_coordinates(geoms) > 5).any()
