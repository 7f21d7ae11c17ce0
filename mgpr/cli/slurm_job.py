r"""``mgpr-slurm-job``: write an sbatch script for mgpr with the resources filled in.

::

    mgpr-slurm-job --gpus-per-node 4 --nodes 2 --cpus-per-task 8 --time 04:00:00 \\
        --partition gpu --account X -- input_path=/data/ortho.tif model=fasterrcnn > job.sh
    sbatch job.sh

The script is ``jobs/job.slurm`` (the template shipped in the package, read with
importlib.resources) with ``--ntasks-per-node`` = ``--gpus-per-node`` (one rank per GPU) and the
Hydra overrides baked in; ``-- -cp conf -cn ortho key=value`` bakes in a config file too (checked
now, from the current directory: submit from the same one). It goes to stdout, or to
``--output FILE`` (refused when FILE exists, unless ``--force``). A bad value is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from mgpr.errors import EXIT_USAGE, ConfigError, MgprError, OutputError
from mgpr.run.slurm import render_job_script

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Print an sbatch script that runs mgpr with one rank per GPU.",
)

_OVERRIDE_KEY_RE = re.compile(r"^[+~]{0,2}([A-Za-z_][A-Za-z0-9_.]*)(=|$)")


def _check_keys(
    arguments: list[str], gpus_per_node: int = 1, nodes: int = 1, cpus_per_task: int | None = None
) -> None:
    """Refuse what the job would refuse, now rather than hours later when it starts.

    Unknown keys, wrong values (types, ranges, a model name), and keys the allocation
    contradicts (``gpus``, ``num_nodes``, ``workers`` above ``--cpus-per-task``): the script's
    preflight refuses them there.
    """
    from mgpr.conf.command import MULTIRUN_REFUSED, parse_command
    from mgpr.conf.load import closest_key, config_keys, load_config

    inv = parse_command(arguments)
    if inv.multirun:
        raise ConfigError(MULTIRUN_REFUSED)
    if inv.cfg or inv.help or inv.slurm_preflight or inv.config_file_keys:
        raise ConfigError(
            "mgpr-slurm-job bakes in overrides and -cp DIR -cn NAME only; "
            "run `mgpr --cfg job ...` here to see the config"
        )
    overrides = list(inv.overrides)
    keys = set(config_keys())
    for item in overrides:
        match = _OVERRIDE_KEY_RE.match(item)
        key = match.group(1) if match else item
        if key.split(".")[0] == "hydra" or key in keys:
            continue
        hint = closest_key(key)
        suggestion = f"did you mean {hint}=?" if hint else "run `mgpr --help` for the keys."
        raise ConfigError(f"unknown mgpr config key {key!r} in override {item!r}: {suggestion}")
    from mgpr.models.registry import check_model_name

    plain = [o for o in overrides if o.split(".")[0] != "hydra"]
    cfg = load_config(plain, inv.config_path, inv.config_name)  # types and ranges, as mgpr does
    check_model_name(cfg.model)
    for key, value, option, allocated in (
        ("gpus", cfg.gpus, "--gpus-per-node", gpus_per_node),
        ("num_nodes", cfg.num_nodes, "--nodes", nodes),
    ):
        if isinstance(value, int) and value not in (-1, allocated):
            raise ConfigError(
                f"{key}={value} but {option} {allocated}: the job runs one rank per GPU on "
                f"each node it gets; drop {key}= (the job sets it) or pass {option} {value}"
            )
    from mgpr.conf.load import explicit_keys

    given = explicit_keys(plain, inv.config_path, inv.config_name)
    if cpus_per_task is not None and "workers" in given and cfg.workers > cpus_per_task:
        # the job's preflight refuses this (workers unset: the job fits them to the CPUs)
        raise ConfigError(
            f"workers={cfg.workers} but --cpus-per-task {cpus_per_task}: pass --cpus-per-task "
            f"{cfg.workers + 1}, or set workers={max(0, cpus_per_task - 1)}"
        )


@app.command()
def render(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Hydra overrides for mgpr, after '--', e.g. input_path=/d/o.tif model=fasterrcnn."
        ),
    ] = None,
    gpus_per_node: Annotated[
        int, typer.Option(min=1, help="GPUs per node; also the ranks (tasks) per node.")
    ] = 1,
    nodes: Annotated[int, typer.Option(min=1, help="Number of nodes.")] = 1,
    cpus_per_task: Annotated[
        int, typer.Option(min=1, help="CPUs per rank; DataLoader workers default to one less.")
    ] = 4,
    time: Annotated[
        str, typer.Option(help="Time limit: HH:MM:SS, minutes, or D-HH:MM:SS.")
    ] = "04:00:00",
    partition: Annotated[
        str | None, typer.Option(help="SLURM partition (default: the cluster's).")
    ] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account to charge.")] = None,
    job_name: Annotated[
        str,
        typer.Option(help="Job name (not 'bash' or 'interactive': Lightning ignores SLURM then)."),
    ] = "mgpr",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", dir_okay=False, help="Write the script here instead of stdout."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --output if it exists.")] = False,
) -> None:
    """Render the sbatch script for GPUS_PER_NODE x NODES ranks and print it (or write --output)."""
    items = list(overrides or [])
    try:
        _check_keys(items, gpus_per_node, nodes, cpus_per_task)
        text = render_job_script(
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            cpus_per_task=cpus_per_task,
            time=time,
            partition=partition,
            account=account,
            job_name=job_name,
            overrides=items,
        )
        _warn_missing_log_folder(Path.cwd())
        if output is None:
            typer.echo(text, nl=False)
            return
        if output.exists() and not force:
            raise OutputError(f"--output {output} exists: pass --force to overwrite it.")
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
            output.chmod(0o755)
        except OSError as err:
            raise OutputError(f"cannot write --output {output}: {err.strerror or err}.") from None
        typer.echo(str(output))
    except MgprError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(EXIT_USAGE) from None


#: Where the sbatch template sends the job's stdout/stderr (``--output=slurm_logs/%j.out``).
LOG_FOLDER = "slurm_logs"


def _warn_missing_log_folder(submit_dir: Path) -> None:
    """Say, on stderr, that sbatch needs ``slurm_logs/`` where the job is submitted.

    SLURM does not create the folder of ``--output``: without it the job fails at once
    (``JobState=FAILED Reason=JobLaunchFailure``) and leaves no log at all to read.
    """
    if not (submit_dir / LOG_FOLDER).is_dir():
        typer.echo(
            f"note: the script logs to {LOG_FOLDER}/<job id>.out, and {submit_dir} has no "
            f"{LOG_FOLDER}/ folder: run `mkdir {LOG_FOLDER}` where you submit, or the job fails "
            "at once with Reason=JobLaunchFailure and no log",
            err=True,
        )


def main() -> None:
    """Console-script entry point."""
    app()
