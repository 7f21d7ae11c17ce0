"""SLURM environment checks and job-script rendering: pure functions over an environment mapping.

mgpr runs one rank per ``srun`` task and one task per GPU; Lightning's ``SLURMEnvironment`` joins
the tasks into one DDP run. Lightning itself compares ``devices`` with ``SLURM_NTASKS_PER_NODE``
only when a DDP strategy is chosen, and says nothing when tasks, GPUs or CPUs disagree in other
ways (two tasks each predicting everything as rank 0, a task per GPU that sees one GPU, more
DataLoader workers than CPUs). :func:`check_slurm_task` refuses these before any work, naming the
sbatch flag to change.

Nothing here imports torch, Lightning or typer: callers pass ``os.environ`` and
``torch.cuda.device_count()`` in, so every case is testable without a cluster.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

from mgpr.errors import ConfigError, SlurmMismatchError

__all__ = [
    "JOB_TEMPLATE",
    "LIGHTNING_NON_SLURM_JOB_NAMES",
    "SlurmTask",
    "check_slurm_task",
    "job_body",
    "job_template",
    "preflight",
    "read_batch_allocation",
    "read_slurm_task",
    "render_job_script",
    "resolve_devices",
]

#: Job names for which Lightning's ``SLURMEnvironment.detect()`` returns False (it assumes an
#: interactive allocation in which the user launches processes some other way).
LIGHTNING_NON_SLURM_JOB_NAMES = frozenset({"bash", "interactive"})

_GPU_ACCELERATORS = frozenset({"gpu", "cuda"})


@dataclass(frozen=True, slots=True)
class SlurmTask:
    """What one ``srun`` task sees of its allocation (from ``SLURM_*`` variables).

    Attributes:
        job_id: ``SLURM_JOB_ID`` (same on every rank and across requeues).
        ntasks: ``SLURM_NTASKS``, tasks in the job step (= world size).
        ntasks_per_node: ``SLURM_NTASKS_PER_NODE``; None when the job was not submitted with
            ``--ntasks-per-node``.
        nnodes: ``SLURM_NNODES`` (or ``SLURM_JOB_NUM_NODES``).
        procid: ``SLURM_PROCID``, global rank.
        localid: ``SLURM_LOCALID``, rank on this node.
        nodeid: ``SLURM_NODEID``, node index within the job.
        cpus_per_task: ``SLURM_CPUS_PER_TASK``; None without ``--cpus-per-task`` (SLURM then
            reserves one CPU per task).
        gpus_on_node: ``SLURM_GPUS_ON_NODE``; None when the job asked for no GPU.
        cuda_visible_devices: ``CUDA_VISIBLE_DEVICES`` as set by SLURM, e.g. ``"0,1"``.
        job_name: ``SLURM_JOB_NAME``.
        step_id: ``SLURM_STEP_ID``: the step of the job (``srun`` calls of one job count 0, 1,
            ...; two running at once must not share a rendezvous port).
    """

    job_id: str
    ntasks: int
    ntasks_per_node: int | None
    nnodes: int
    procid: int
    localid: int
    nodeid: int
    cpus_per_task: int | None
    gpus_on_node: int | None
    cuda_visible_devices: str | None
    job_name: str
    step_id: str = ""


def _int(env: Mapping[str, str], *names: str) -> int | None:
    """First of ``names`` present in ``env`` as an int; leading digits only (``"2(x3)"`` -> 2)."""
    for name in names:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        match = re.match(r"\s*(\d+)", raw)
        if match is None:
            raise SlurmMismatchError(
                f"{name}={raw!r} is not a number; SLURM's environment is damaged."
            )
        return int(match.group(1))
    return None


def read_slurm_task(env: Mapping[str, str]) -> SlurmTask | None:
    """Read the ``srun`` task this process is, or None outside an ``srun`` step.

    The batch shell of an ``sbatch`` job has ``SLURM_PROCID=0`` but no ``SLURM_STEP_ID``; both are
    required, so mgpr started without ``srun`` in a batch script is not mistaken for a task.

    Args:
        env: usually ``os.environ``.

    Returns:
        The task, or None when ``SLURM_PROCID`` or ``SLURM_STEP_ID``/``SLURM_STEPID`` is missing.
    """
    procid = _int(env, "SLURM_PROCID")
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if procid is None or step is None:
        return None
    ntasks = _int(env, "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS") or 1
    return SlurmTask(
        job_id=env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "")),
        ntasks=ntasks,
        ntasks_per_node=_int(env, "SLURM_NTASKS_PER_NODE"),
        nnodes=_int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1,
        procid=procid,
        localid=_int(env, "SLURM_LOCALID") or 0,
        nodeid=_int(env, "SLURM_NODEID") or 0,
        cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"),
        gpus_on_node=_int(env, "SLURM_GPUS_ON_NODE"),
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        job_name=env.get("SLURM_JOB_NAME", ""),
        step_id=step,
    )


def read_batch_allocation(env: Mapping[str, str]) -> SlurmTask | None:
    """The allocation as the batch shell of an ``sbatch`` job sees it, as ``srun``'s rank 0.

    The batch shell has no ``SLURM_STEP_ID``, and no ``SLURM_NTASKS`` unless ``--ntasks`` or
    ``--ntasks-per-node`` was given (``srun`` then starts one task per node).

    Args:
        env: usually ``os.environ`` of the batch shell.

    Returns:
        The task ``srun`` will start as rank 0, or None outside a SLURM job.
    """
    if not env.get("SLURM_JOB_ID", env.get("SLURM_JOBID")):
        return None
    step_env = dict(env)
    step_env.setdefault("SLURM_PROCID", "0")
    step_env.setdefault("SLURM_STEP_ID", "batch")
    if not any(env.get(k) for k in ("SLURM_NTASKS", "SLURM_NPROCS")):
        step_env["SLURM_NTASKS"] = str(_int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1)
    return read_slurm_task(step_env)


def preflight(
    env: Mapping[str, str], devices: int | None, num_nodes: int | None, workers: int
) -> None:
    """The checks of :func:`check_slurm_task` that need no torch, run in the batch shell.

    ``jobs/job.slurm`` runs ``mgpr --slurm-preflight <overrides>`` before ``srun``, so a config
    that disagrees with the allocation fails once, in about a second, with one line and exit
    code 2. GPU visibility needs torch and is checked by every rank later.

    Raises:
        SlurmMismatchError: as :func:`check_slurm_task`.
    """
    task = read_batch_allocation(env)
    if task is not None:
        check_slurm_task(task, devices, num_nodes, workers, "cpu", 0)


def _tasks_per_node(task: SlurmTask) -> int:
    """Ranks per node: ``--ntasks-per-node``, else ntasks spread evenly over nodes (at least 1)."""
    if task.ntasks_per_node is not None:
        return task.ntasks_per_node
    return max(1, task.ntasks // max(1, task.nnodes))


def resolve_devices(
    task: SlurmTask | None,
    devices: int | None,
    num_nodes: int | None,
    *,
    default_devices: int = 1,
) -> tuple[int, int]:
    """Devices (ranks) per node and number of nodes for the Trainer.

    Under ``srun`` the defaults come from SLURM (``--ntasks-per-node`` and ``--nodes``), so a
    batch job needs no ``gpus=``; a value given explicitly is kept (and checked by
    :func:`check_slurm_task`). Outside SLURM, ``devices`` defaults to ``default_devices`` (pass
    ``torch.cuda.device_count() or 1``) and ``num_nodes`` to 1.

    Args:
        task: from :func:`read_slurm_task`, or None outside an ``srun`` step.
        devices: config ``gpus``/``devices``; None for auto.
        num_nodes: config ``num_nodes``; None for auto.
        default_devices: devices per node outside SLURM when ``devices`` is None.

    Returns:
        ``(devices_per_node, num_nodes)``, both >= 1.
    """
    if devices is not None and devices < 1:
        raise ConfigError(f"gpus={devices} must be >= 1 (or left unset for auto).")
    if num_nodes is not None and num_nodes < 1:
        raise ConfigError(f"num_nodes={num_nodes} must be >= 1 (or left unset for auto).")
    if task is None:
        return (devices if devices is not None else max(1, default_devices), num_nodes or 1)
    return (
        devices if devices is not None else _tasks_per_node(task),
        num_nodes if num_nodes is not None else task.nnodes,
    )


def _visible_count(cuda_visible_devices: str | None) -> int | None:
    if cuda_visible_devices is None:
        return None
    return len([d for d in cuda_visible_devices.split(",") if d.strip()])


def check_task_layout(task: SlurmTask) -> None:
    """Refuse a step whose tasks per node are unknown or do not add up to its task count.

    Runs before the ranks join (:func:`mgpr.run.rendezvous.join_early`): Lightning's
    SLURMEnvironment refuses the same layouts there with a traceback per rank (``srun -n2``
    without ``--ntasks-per-node``), exit 1.

    Raises:
        SlurmMismatchError: ``--ntasks`` without ``--ntasks-per-node``, or a task count other
            than ``--ntasks-per-node`` x ``--nodes``.
    """
    if task.ntasks_per_node is None and task.ntasks > 1:
        raise SlurmMismatchError(
            f"SLURM started {task.ntasks} tasks (SLURM_NTASKS={task.ntasks}) without "
            f"--ntasks-per-node, so ranks per node are unknown: submit with "
            f"--ntasks-per-node=N instead of --ntasks, N = GPUs per node."
        )
    if task.ntasks_per_node is not None and task.ntasks != task.ntasks_per_node * task.nnodes:
        raise SlurmMismatchError(
            f"SLURM started {task.ntasks} tasks but sbatch --ntasks-per-node={task.ntasks_per_node}"
            f" x --nodes={task.nnodes} is {task.ntasks_per_node * task.nnodes}: submit with "
            f"--ntasks-per-node and --nodes only (no --ntasks, no srun -n)."
        )


def check_slurm_task(
    task: SlurmTask,
    devices: int | None,
    num_nodes: int | None,
    workers: int,
    accelerator: str,
    cuda_device_count: int,
) -> list[str]:
    """Refuse a config that disagrees with the SLURM allocation; return warnings for the rest.

    Call it on every rank before building the Trainer (each rank sees the same allocation, so
    every rank raises the same error and none waits for the others).

    Args:
        task: this process's task, from :func:`read_slurm_task`.
        devices: config ``gpus``/``devices``; None for auto (= ``--ntasks-per-node``).
        num_nodes: config ``num_nodes``; None for auto (= ``--nodes``).
        workers: DataLoader workers per rank (config ``workers``).
        accelerator: ``auto``, ``cpu`` or ``gpu`` (``cuda`` counts as ``gpu``).
        cuda_device_count: ``torch.cuda.device_count()`` in this task.

    Returns:
        Warning lines (one sentence each); empty when all is consistent.

    Raises:
        SlurmMismatchError: tasks started with ``--ntasks`` but no ``--ntasks-per-node``; a step
            whose task count differs from ``--ntasks-per-node`` x ``--nodes``; ``gpus`` differs
            from ``--ntasks-per-node``; ``num_nodes`` differs from ``--nodes``; more ranks per node
            than GPUs a task can see (GPU mode); ``workers`` above ``--cpus-per-task``.
    """
    warnings: list[str] = []
    accel = accelerator.lower()
    gpu_mode = accel in _GPU_ACCELERATORS or (accel == "auto" and cuda_device_count > 0)

    check_task_layout(task)
    tpn = _tasks_per_node(task)
    if devices is not None and devices != tpn:
        raise SlurmMismatchError(
            f"gpus={devices} but sbatch --ntasks-per-node={tpn}: submit with "
            f"--ntasks-per-node={devices} --gpus-per-node={devices}, or drop gpus=."
        )
    if num_nodes is not None and num_nodes != task.nnodes:
        raise SlurmMismatchError(
            f"num_nodes={num_nodes} but sbatch --nodes={task.nnodes}: submit with "
            f"--nodes={num_nodes}, or drop num_nodes=."
        )

    visible = _visible_count(task.cuda_visible_devices)
    if accel in _GPU_ACCELERATORS and cuda_device_count == 0:
        raise SlurmMismatchError(
            f"accelerator={accelerator} but no GPU is visible to this task "
            f"(CUDA_VISIBLE_DEVICES={task.cuda_visible_devices or 'unset'}): submit with "
            f"--gpus-per-node={tpn}, or set accelerator=cpu."
        )
    if gpu_mode and tpn > cuda_device_count:
        if task.gpus_on_node is not None and task.gpus_on_node >= tpn:
            # The node has enough GPUs but each task sees only its own (--gpus-per-task /
            # --gpu-bind): Lightning picks cuda:LOCAL_RANK, which does not exist in the task.
            raise SlurmMismatchError(
                f"sbatch --ntasks-per-node={tpn} but each task sees only {cuda_device_count} GPU(s)"
                f" (CUDA_VISIBLE_DEVICES={task.cuda_visible_devices}) of the node's "
                f"{task.gpus_on_node}: submit with --gpus-per-node={tpn} instead of "
                f"--gpus-per-task (every rank must see all GPUs of its node)."
            )
        raise SlurmMismatchError(
            f"sbatch --ntasks-per-node={tpn} starts {tpn} ranks per node but only "
            f"{cuda_device_count} GPU(s) are visible (SLURM_GPUS_ON_NODE="
            f"{task.gpus_on_node if task.gpus_on_node is not None else 'unset'}): submit with "
            f"--gpus-per-node={tpn}, or --ntasks-per-node={cuda_device_count}."
        )
    if gpu_mode and cuda_device_count > tpn:
        warnings.append(
            f"{cuda_device_count} GPUs visible but sbatch --ntasks-per-node={tpn}: "
            f"{cuda_device_count - tpn} GPU(s) stay idle; submit with "
            f"--ntasks-per-node={cuda_device_count} to use them."
        )

    if task.cpus_per_task is not None:
        if workers > task.cpus_per_task:
            raise SlurmMismatchError(
                f"workers={workers} but sbatch --cpus-per-task={task.cpus_per_task}: submit with "
                f"--cpus-per-task={workers + 1}, or set workers={max(0, task.cpus_per_task - 1)}."
            )
        if workers == task.cpus_per_task and workers > 0:
            warnings.append(
                f"workers={workers} equals sbatch --cpus-per-task={task.cpus_per_task}, leaving no "
                f"CPU for the rank itself: set workers={workers - 1} or submit with "
                f"--cpus-per-task={workers + 1}."
            )
    elif workers > 0:
        warnings.append(
            f"workers={workers} but the job has no --cpus-per-task, so SLURM reserves 1 CPU per "
            f"task: submit with --cpus-per-task={workers + 1}."
        )

    if not gpu_mode and accel == "auto" and visible:
        warnings.append(
            f"SLURM set CUDA_VISIBLE_DEVICES={task.cuda_visible_devices} but torch sees no GPU: "
            f"falling back to CPU ranks (gloo); set accelerator=gpu to make this an error."
        )
    if task.job_name in LIGHTNING_NON_SLURM_JOB_NAMES:
        warnings.append(
            f"SLURM job name {task.job_name!r} disables Lightning's SLURM detection (it assumes an "
            f"interactive session): submit with --job-name=mgpr."
        )
    return warnings


# --------------------------------------------------------------------------------------------
# Job script
# --------------------------------------------------------------------------------------------

#: Where the one sbatch template lives inside the package (``jobs/job.slurm`` links here), so a
#: wheel install and an editable one both find it with importlib.resources.
JOB_TEMPLATE = ("mgpr.run", "templates/job.slurm")


def job_template() -> str:
    """The text of the sbatch template (``jobs/job.slurm``), read from the installed package."""
    package, name = JOB_TEMPLATE
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def job_body() -> str:
    """Everything of the template after ``set -euo pipefail``: what a rendered script runs."""
    return job_template().split("set -euo pipefail\n", 1)[1]


# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_RE = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def render_job_script(
    gpus_per_node: int,
    nodes: int,
    cpus_per_task: int,
    time: str,
    partition: str | None,
    account: str | None,
    job_name: str,
    overrides: Sequence[str],
) -> str:
    """An sbatch script equivalent to ``jobs/job.slurm`` with the resources filled in.

    The script asks for ``--ntasks-per-node`` = ``--gpus-per-node`` = ``gpus_per_node`` (one rank
    per GPU) and bakes ``overrides`` in; Hydra overrides given to ``sbatch script.sh ...`` come
    after them (so they win). Its body is the template's (:func:`job_body`).

    Args:
        gpus_per_node: GPUs and ranks per node, >= 1.
        nodes: nodes, >= 1.
        cpus_per_task: CPUs per rank, >= 1 (DataLoader workers default to one less).
        time: SLURM time limit, e.g. ``04:00:00`` or ``1-00:00:00``.
        partition: ``--partition``, or None for the cluster default.
        account: ``--account``, or None.
        job_name: ``--job-name``; not ``bash``/``interactive`` (Lightning ignores SLURM for those).
        overrides: Hydra overrides such as ``input_path=/data/ortho.tif``, and the config file
            flags ``-cp DIR`` / ``-cn NAME`` (``--config-path``/``--config-name``, also ``=``).

    Returns:
        The script text (bash), ending with a newline.

    Raises:
        ConfigError: a count below 1, a malformed time, partition, account or job name, or an
            override that is not ``key=value`` / ``~key``.
    """
    for flag, value in (
        ("--gpus-per-node", gpus_per_node),
        ("--nodes", nodes),
        ("--cpus-per-task", cpus_per_task),
    ):
        if value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1.")
    if not _TIME_RE.match(time):
        raise ConfigError(
            f"--time={time!r} is not a SLURM time: use HH:MM:SS, MM, or D-HH:MM:SS (e.g. 04:00:00)."
        )
    names: tuple[tuple[str, str | None], ...] = (
        ("--partition", partition),
        ("--account", account),
        ("--job-name", job_name),
    )
    for flag, name in names:
        if name is not None and not _NAME_RE.match(name):
            raise ConfigError(
                f"{flag}={name!r} has characters SLURM names do not use: use letters, digits, "
                f"'_', '.', '+' or '-'."
            )
    if job_name in LIGHTNING_NON_SLURM_JOB_NAMES:
        raise ConfigError(
            f"--job-name={job_name} makes Lightning ignore SLURM (it assumes an interactive "
            f"session): use another name, e.g. --job-name=mgpr."
        )
    _check_job_arguments(overrides)

    sbatch = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={gpus_per_node}",
        f"--gpus-per-node={gpus_per_node}",
        f"--cpus-per-task={cpus_per_task}",
        f"--time={time}",
    ]
    if partition is not None:
        sbatch.append(f"--partition={partition}")
    if account is not None:
        sbatch.append(f"--account={account}")
    sbatch += [
        "--output=slurm_logs/%j.out",
        "--error=slurm_logs/%j.err",
        "--open-mode=append",
        "--signal=USR1@120",
        "--requeue",
    ]
    lines = [
        "#!/bin/bash",
        f"# mgpr on SLURM: {nodes} node(s) x {gpus_per_node} GPU(s), one rank per GPU "
        f"({nodes * gpus_per_node} ranks).",
        "# Rendered by mgpr-slurm-job. Submit from any directory (its slurm_logs/ must exist):",
        "#   sbatch THIS_FILE [more Hydra overrides]",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "set -euo pipefail",
    ]
    if overrides:
        lines.append("set -- " + " ".join(shlex.quote(o) for o in overrides) + ' "$@"')
    return "\n".join(lines) + "\n" + job_body()


#: The config file flags a job script may pass to mgpr, each followed by its value.
_FILE_FLAGS = ("-cp", "-cn", "--config-path", "--config-name")


def _check_job_arguments(overrides: Sequence[str]) -> None:
    """Only ``key=value`` / ``~key`` overrides and the config file flags, one line each."""
    expect_value = None
    for item in overrides:
        if "\n" in item:
            raise ConfigError(f"override {item!r} holds a newline; pass one line per argument.")
        if expect_value is not None:
            expect_value = None
            continue
        if item in _FILE_FLAGS:
            expect_value = item
        elif item.split("=", 1)[0] in _FILE_FLAGS and "=" in item:
            continue
        elif not ("=" in item or item.startswith("~")) or item.startswith("-"):
            raise ConfigError(
                f"override {item!r} is not a Hydra override: write key=value (e.g. "
                f"input_path=/data/ortho.tif), or -cp DIR -cn NAME for a config file, after '--'."
            )
    if expect_value is not None:
        raise ConfigError(f"{expect_value} needs a value, e.g. {expect_value} conf, after '--'.")
