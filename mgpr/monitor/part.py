"""One rank's report part: what it is made of, and the device facts that go into it.

Each rank writes ``run_dir/report_parts/rank{global_rank}.json`` (schema ``mgpr.report_part/1``)
at the end of predict; rank 0 merges them (:func:`mgpr.monitor.report.build_report`):

    ============================  =======  =========================================================
    key                           type     meaning (unit)
    ============================  =======  =========================================================
    schema                        str      ``"mgpr.report_part/1"``
    status                        str      ``"finished"``, ``"failed"`` or ``"interrupted"``
                                           (a stop signal), both from on_exception
    error                         str|null exception type and message when failed or
                                           interrupted (``RunInterrupted: SIGTERM``)
    hostname                      str      node name (SLURMD_NODENAME under SLURM, else host)
    global_rank, local_rank,      int      Lightning ranks; world_size = number of ranks
    node_rank, world_size
    device                        str      ``"cuda:0"`` (local ordinal) or ``"cpu"``
    monitor_source                str      ``"nvml"``, ``"nvml-mig"`` (memory only), ``"torch"``
                                           (CUDA without NVML) or ``"host"`` (CPU: RSS only)
    gpu                           obj|null name, uuid (``GPU-``/``MIG-``, the device the rank
                                           uses), physical_index (NVML index of the physical GPU,
                                           null without NVML), memory_total_bytes (bytes), mig
    host_memory_total_bytes       int      physical memory of the node (bytes)
    host_memory_limit_bytes       int|null the cgroup memory limit of the rank (``sbatch
                                           --mem``, a container's), when below the node's
                                           memory (bytes); null: none
    interval_s                    float    sampling interval (s)
    wall_s, data_wait_s,          float    see the timing model in :mod:`mgpr.monitor.callback`
    compute_s
    stages_s                      obj      stage name -> blocking seconds (s)
    stages_background_s           obj      stage name -> seconds recorded from other threads (s)
    batches, tiles                int      batches and tiles this rank predicted
    tiles_per_s                   float    tiles / wall_s (tiles/s)
    model_tiles                   int      of ``tiles``, those the model ran on (status OK: not
                                           nodata, not unreadable)
    model_tiles_per_s             float    model_tiles / wall_s (tiles/s)
    steady_tiles_per_s            float|null tiles after the first batch / time after it (tiles/s):
                                           the rate without start-up (workers starting, kernel
                                           choice); null unless 2+ batches holding at least
                                           the first batch's tiles follow it
                                           (:func:`mgpr.monitor.callback.steady_rate`)
    predict_start_unix_s,         float|null wall-clock time (s since the epoch) of predict start
                                           (the DataLoader iterator's creation)
    first_batch_unix_s                     and of the first batch's arrival (start-up figures)
    cuda_synchronized             bool     compute_s measured with a sync at batch end
    values_clipped                obj|null valid values (every band of every valid pixel) the
                                           ``value_range`` clamp moved: below, above, values
                                           (counts; :mod:`mgpr.data.clipping`), peak (brightest
                                           valid value, share of [lo, hi]) and inputs (per
                                           raster path [below, above, values, peak]); null
                                           where none can clip (uint8 by [0, 255], raw values)
    stats                         obj      exact over ALL samples: samples (count) and
                                           <field>_avg / <field>_peak for every sample field
    samples                       obj      columns, evenly thinned to <= 10 000 rows: t_s (s since
                                           predict start), mem_used_bytes (NVML, all processes,
                                           bytes), util_pct (NVML busy share, %),
                                           torch_allocated_bytes, torch_reserved_bytes,
                                           torch_max_allocated_bytes, rss_bytes (bytes); null
                                           where a source is unavailable
    ============================  =======  =========================================================
"""

from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple

from mgpr.monitor.memory_limit import MemoryLimit, cgroup_memory_limit, memory_limit
from mgpr.monitor.nvml import GpuInfo

PART_SCHEMA = "mgpr.report_part/1"


class CudaProps(NamedTuple):
    """What torch says about a CUDA device.

    Attributes:
        name: product name.
        uuid: the device uuid as torch prints it (16 bytes, no ``GPU-``/``MIG-`` prefix).
        memory_total_bytes: device memory, bytes.
    """

    name: str
    uuid: str
    memory_total_bytes: int


def cuda_props(index: int) -> CudaProps | None:
    """``torch.cuda.get_device_properties(index)`` as :class:`CudaProps`, or None on any error."""
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
        return CudaProps(str(props.name), str(props.uuid), int(props.total_memory))
    except Exception:  # noqa: BLE001 - monitoring never fails a run
        return None


def gpu_fields(gpu: GpuInfo | None, props: CudaProps | None) -> dict[str, Any] | None:
    """The part's ``gpu`` object: from NVML when it found the device, else from torch."""
    if gpu is not None:
        return {
            "name": gpu.name,
            "uuid": gpu.uuid,
            "physical_index": gpu.physical_index,
            "memory_total_bytes": int(gpu.memory_total_bytes),
            "mig": gpu.mig,
        }
    if props is not None:
        uuid = props.uuid if props.uuid.startswith(("GPU-", "MIG-")) else f"GPU-{props.uuid}"
        return {
            "name": props.name,
            "uuid": uuid,
            "physical_index": None,
            "memory_total_bytes": props.memory_total_bytes,
            "mig": False,
        }
    return None


def host_memory_total() -> int | None:
    """Physical memory of this node, bytes (psutil), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return None


def host_memory_limit() -> MemoryLimit | None:
    """The memory this process may use: the node's, or a cgroup's limit below it (``--mem``)."""
    return memory_limit(host_memory_total(), cgroup_memory_limit())


def hostname() -> str:
    """The node's name: ``SLURMD_NODENAME`` under SLURM (what ``squeue`` shows), else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
