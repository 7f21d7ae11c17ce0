"""``mgpr-doctor``: check that this machine (or this SLURM task) can run mgpr, one line per check.

::

    mgpr-doctor [--workers 7] [--batch-size 16 --tile-size 1024] [--model resnet50]
                [--output-dir runs]
    srun --ntasks-per-node=2 --gpus-per-node=2 mgpr-doctor     # check what each rank will see

Each line is ``OK|WARN|FAIL  <check>: <finding> [-> fix]`` on stdout. The exit code is 1 when any
check FAILs, else 0. No GPU is a WARN, not a FAIL: mgpr runs on CPU ranks (gloo) as well.
"""

from __future__ import annotations

import enum
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from mgpr.errors import SlurmMismatchError
from mgpr.geo.headers import usable_cpus
from mgpr.models.registry import downloadable_models
from mgpr.run.slurm import check_slurm_task, read_slurm_task

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Check torch, GPUs, NCCL/gloo, rasterio/GDAL, SLURM variables, weights and disk for mgpr.",
)

DEFAULT_MODELS = downloadable_models()
#: Free space below which the output disk check warns / fails, in bytes.
WARN_FREE_BYTES = 5 * 2**30
FAIL_FREE_BYTES = 200 * 2**20


class Status(enum.StrEnum):
    """Outcome of one check."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


class Accelerator(enum.StrEnum):
    """Accelerator the run will use (config ``accelerator``)."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report."""

    status: Status
    check: str
    finding: str
    fix: str | None = None

    def line(self) -> str:
        """``OK|WARN|FAIL  <check>: <finding> [-> fix]``."""
        text = f"{self.status.value:<4}  {self.check}: {self.finding}"
        return f"{text} -> {self.fix}" if self.fix else text


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """What the run will ask for (the doctor's options)."""

    workers: int | None
    gpus: int | None
    accelerator: Accelerator
    models: tuple[str, ...]
    output_dir: Path
    batch_size: int | None = None
    tile_size: int | None = None


def check_torch(accelerator: Accelerator = Accelerator.AUTO) -> list[Finding]:
    """Torch version, CUDA build and availability, GPU names.

    No usable GPU is a warning (mgpr runs CPU ranks), a failure with ``accelerator=gpu``,
    which mgpr refuses then.
    """
    import torch

    cuda_build = torch.version.cuda or "none (CPU-only build)"
    out = []
    if torch.cuda.is_available():
        out.append(Finding(Status.OK, "torch", f"{torch.__version__}, CUDA {cuda_build} available"))
        n = torch.cuda.device_count()
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(n))
        out.append(Finding(Status.OK, "gpus", f"{n} visible ({names})"))
    else:
        out.append(
            Finding(Status.WARN, "torch", f"{torch.__version__}, CUDA {cuda_build}, no GPU usable")
        )
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else "CUDA_VISIBLE_DEVICES unset"
        if accelerator == Accelerator.GPU:
            out.append(
                Finding(
                    Status.FAIL,
                    "gpus",
                    f"0 visible ({seen}), and accelerator=gpu asks for one: mgpr refuses the run",
                    "run on a GPU node (sbatch --gpus-per-node=N) and check nvidia-smi, or use "
                    "accelerator=auto / cpu",
                )
            )
        else:
            out.append(
                Finding(
                    Status.WARN,
                    "gpus",
                    f"0 visible ({seen}); mgpr will run CPU ranks (gloo)",
                    "run on a GPU node (sbatch --gpus-per-node=N) and check nvidia-smi",
                )
            )
    return out


def check_backends() -> list[Finding]:
    """Gloo (every run's process group, GPU runs included) and NCCL in torch.distributed.

    mgpr coordinates its ranks over gloo even on GPUs (no tensor collectives, no NCCL
    watchdog), so gloo is required and NCCL is only reported.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return [
            Finding(
                Status.FAIL,
                "distributed",
                "torch.distributed is not available in this torch build",
                "install a torch wheel with distributed support (the default PyPI wheels)",
            )
        ]
    out = []
    nccl = "available" if dist.is_nccl_available() else "not available"
    out.append(Finding(Status.OK, "nccl", f"{nccl} (not used: mgpr's ranks coordinate over gloo)"))
    if dist.is_gloo_available():
        out.append(Finding(Status.OK, "gloo", "available"))
    else:
        out.append(
            Finding(
                Status.FAIL,
                "gloo",
                "not available; every multi-rank run needs it",
                "install a torch wheel with distributed support (the default PyPI wheels)",
            )
        )
    return out


def check_rasterio() -> list[Finding]:
    """Rasterio and its GDAL."""
    try:
        import rasterio
    except ImportError as err:
        return [Finding(Status.FAIL, "rasterio", f"cannot import: {err}", "uv sync --frozen")]
    return [
        Finding(Status.OK, "rasterio", f"{rasterio.__version__}, GDAL {rasterio.__gdal_version__}")
    ]


def check_slurm(env: Mapping[str, str], opts: DoctorOptions, n_gpus: int) -> list[Finding]:
    """SLURM variables of this task against the run's gpus/workers/accelerator."""
    task = read_slurm_task(env)
    if task is None:
        if env.get("SLURM_JOB_ID"):
            return [
                Finding(
                    Status.OK,
                    "slurm",
                    f"in job {env['SLURM_JOB_ID']} but not in an srun task (batch shell)",
                    "run `srun mgpr-doctor` to check what the ranks see",
                )
            ]
        return [Finding(Status.OK, "slurm", "not in a SLURM task")]
    where = (
        f"job {task.job_id} rank {task.procid}/{task.ntasks}, node {task.nodeid}/{task.nnodes}, "
        f"{task.ntasks_per_node if task.ntasks_per_node is not None else 'unset'} tasks per node"
    )
    try:
        warnings = check_slurm_task(
            task,
            devices=opts.gpus,
            num_nodes=None,
            workers=opts.workers if opts.workers is not None else 0,
            accelerator=opts.accelerator.value,
            cuda_device_count=n_gpus,
        )
    except SlurmMismatchError as err:
        return [Finding(Status.FAIL, "slurm", f"{where}; {err}")]
    out = [Finding(Status.OK, "slurm", where)]
    out += [Finding(Status.WARN, "slurm", w) for w in warnings]
    return out


def check_cpus(env: Mapping[str, str], workers: int | None) -> list[Finding]:
    """CPUs this process may use (and SLURM's --cpus-per-task) against DataLoader workers."""
    usable = usable_cpus()
    cpt_raw = env.get("SLURM_CPUS_PER_TASK")
    cpus = int(cpt_raw) if cpt_raw and cpt_raw.isdigit() else usable
    source = f"SLURM_CPUS_PER_TASK={cpt_raw}" if cpt_raw else f"{usable} usable (affinity)"
    suggested = max(0, cpus - 1)
    if workers is None:
        return [
            Finding(
                Status.OK,
                "cpus",
                f"{source}; suggested workers={suggested} (one CPU stays with the rank)",
            )
        ]
    if workers > cpus:
        fix = (
            f"sbatch --cpus-per-task={workers + 1}, or workers={suggested}"
            if cpt_raw
            else f"workers={suggested}"
        )
        return [Finding(Status.WARN, "cpus", f"{source} but workers={workers}", fix)]
    return [Finding(Status.OK, "cpus", f"{source}, workers={workers}")]


def check_shared_memory(
    workers: int | None,
    batch_size: int | None,
    tile_size: int | None,
    path: str | None = None,
    bytes_per_px: int = 3,
    ranks_per_node: int = 1,
) -> list[Finding]:
    """Free /dev/shm against what the node's DataLoader batch buffers may hold.

    Workers hand batches to their rank through shared memory; when it runs out a worker dies of
    SIGBUS mid-run. Every rank of a node shares its /dev/shm, so the need is ``ranks_per_node``
    x one rank's. Unset options take the run's defaults. ``bytes_per_px``: bands x carrier
    itemsize, + 1 for a raster with a nodata mask (3 for uint8 RGB, 8 for a uint16 4-band raster).
    """
    from mgpr.conf.schema import PredictConfig
    from mgpr.data.batch_pool import SHM_PATH, shared_memory_free, shared_memory_need

    defaults = PredictConfig()
    workers = defaults.workers if workers is None else workers
    batch_size = batch_size or defaults.batch_size
    tile_size = tile_size or defaults.tile_size
    where = path or SHM_PATH
    if workers == 0:
        return [Finding(Status.OK, "shared memory", "workers=0: batches stay in the rank")]
    free = shared_memory_free(where)
    if free is None:
        return [Finding(Status.OK, "shared memory", f"no {where} here (not Linux): not checked")]
    ranks = max(1, ranks_per_node)
    need = ranks * shared_memory_need(workers, batch_size, bytes_per_px * tile_size * tile_size)
    setting = f"workers={workers}, batch_size={batch_size}, tile_size={tile_size}"
    if ranks > 1:
        setting = f"{ranks} ranks on this node x ({setting})"
    found = (
        f"{where} has {free / 2**30:.2f} GiB free; {setting} may need up to {need / 2**30:.2f} GiB"
    )
    if need > free:
        fix = "lower batch_size or workers, or ask for more (docker run --shm-size=8g)"
        return [Finding(Status.WARN, "shared memory", found, fix)]
    return [Finding(Status.OK, "shared memory", found)]


def _ranks_per_node(gpus: int | None, env: Mapping[str, str], n_gpus: int) -> int:
    """Ranks a run would start on this node: ``gpus=``, else srun's tasks per node, else GPUs."""
    if gpus:
        return gpus
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        return int(per_node)
    return max(1, n_gpus)


def check_weights(models: tuple[str, ...]) -> list[Finding]:
    """Torchvision DEFAULT weights of each model present in the torch hub cache."""
    import torch

    from mgpr.models.weights import weights_cache_file

    hub = torch.hub.get_dir()
    out = []
    for name in models:
        try:
            path = weights_cache_file(name, "DEFAULT")
        except Exception as err:  # an unknown name may raise in the registry
            out.append(Finding(Status.WARN, f"weights {name}", f"cannot resolve: {err}"))
            continue
        if path is None:
            out.append(
                Finding(Status.OK, f"weights {name}", "no downloadable weights (nothing to fetch)")
            )
        elif path.is_file():
            size = path.stat().st_size / 2**20
            out.append(Finding(Status.OK, f"weights {name}", f"{path} ({size:.0f} MiB)"))
        else:
            out.append(
                Finding(
                    Status.WARN,
                    f"weights {name}",
                    f"{path.name} not in {hub}/checkpoints; the first run downloads it "
                    "(fails on offline compute nodes)",
                    f"mgpr-fetch-weights {name} on a login node with the same TORCH_HOME",
                )
            )
    return out


def check_disk(output_dir: Path) -> list[Finding]:
    """Free space and write permission where the output dir is (or will be)."""
    target = output_dir.resolve()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    desc = f"{free / 2**30:.1f} GiB free at {probe}" + (
        "" if probe == target else f" (for {target})"
    )
    if not os.access(probe, os.W_OK):
        return [Finding(Status.FAIL, "disk", f"{desc}, not writable", "choose another output_dir=")]
    if free < FAIL_FREE_BYTES:
        return [Finding(Status.FAIL, "disk", desc, "free space or choose another output_dir=")]
    if free < WARN_FREE_BYTES:
        return [Finding(Status.WARN, "disk", desc, "large rasters need more; check output_dir=")]
    return [Finding(Status.OK, "disk", desc)]


def check_filesystem(output_dir: Path) -> list[Finding]:
    """The run directory's filesystem type and the mount options known to hurt mgpr."""
    from mgpr.outputs.filesystem import describe_mount, mount_warnings, run_dir_mount

    mount = run_dir_mount(output_dir)
    desc = describe_mount(mount)
    problems = mount_warnings(mount) if mount is not None else []
    if not problems:
        return [Finding(Status.OK, "filesystem", f"{desc} (mgpr takes no file locks)")]
    return [Finding(Status.WARN, "filesystem", problem) for problem in problems]


def run_checks(opts: DoctorOptions, env: Mapping[str, str]) -> list[Finding]:
    """Every check, in report order; a check that crashes is a FAIL line, never a traceback."""
    findings: list[Finding] = []

    def guarded(name: str, fn: Callable[[], list[Finding]]) -> None:
        try:
            findings.extend(fn())
        except Exception as err:  # the doctor reports, it does not crash
            findings.append(
                Finding(Status.FAIL, name, f"check crashed: {type(err).__name__}: {err}")
            )

    n_gpus = 0
    guarded("torch", lambda: check_torch(opts.accelerator))
    try:
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n_gpus = 0
    guarded("distributed", check_backends)
    guarded("rasterio", check_rasterio)
    guarded("slurm", lambda: check_slurm(env, opts, n_gpus))
    guarded("cpus", lambda: check_cpus(env, opts.workers))
    guarded(
        "shared memory",
        lambda: check_shared_memory(
            opts.workers,
            opts.batch_size,
            opts.tile_size,
            ranks_per_node=_ranks_per_node(opts.gpus, env, n_gpus),
        ),
    )
    guarded("weights", lambda: check_weights(opts.models))
    guarded("disk", lambda: check_disk(opts.output_dir))
    guarded("filesystem", lambda: check_filesystem(opts.output_dir))
    return findings


@app.command()
def doctor(
    workers: Annotated[
        int | None, typer.Option(min=0, help="DataLoader workers per rank the run will use.")
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(min=1, help="gpus= the run will pass (default: auto).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="batch_size= the run will use (shared memory check).")
    ] = None,
    tile_size: Annotated[
        int | None, typer.Option(min=1, help="tile_size= the run will use (shared memory check).")
    ] = None,
    accelerator: Annotated[
        Accelerator, typer.Option(help="Accelerator the run will use.")
    ] = Accelerator.AUTO,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Model whose weights must be cached (repeatable; default: "
            f"{', '.join(DEFAULT_MODELS)})."
        ),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option(file_okay=False, help="Where the run will write (disk space check).")
    ] = Path("runs"),
) -> None:
    """Print one OK/WARN/FAIL line per check; exit 1 when any check fails."""
    opts = DoctorOptions(
        workers=workers,
        gpus=gpus,
        batch_size=batch_size,
        tile_size=tile_size,
        accelerator=accelerator,
        models=tuple(model) if model else DEFAULT_MODELS,
        output_dir=output_dir,
    )
    findings = run_checks(opts, os.environ)
    for f in findings:
        typer.echo(f.line())
    if any(f.status is Status.FAIL for f in findings):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
