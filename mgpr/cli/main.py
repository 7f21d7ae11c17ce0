"""Entry point of ``mgpr``: a config file and ``key=value`` overrides in, exit code out.

The command line is a Hydra app's (:mod:`mgpr.conf.command`): ``-cp DIR -cn NAME`` reads
``DIR/NAME.yaml`` with the overrides on top, ``--cfg job`` prints the resolved config and runs
nothing, ``-m/--multirun`` is refused. Lightning's subprocess launcher (``gpus=2`` without srun)
re-runs this same command line for the other ranks, in the same working directory, so a relative
``-cp`` names the same file there. Expected mistakes (:class:`~mgpr.errors.MgprError`) become
one line on stderr and the error's exit code (2; 4 for tiles missing at the merge); anything
else is a bug and keeps its traceback. Heavy imports (torch, Lightning) happen only after the
config is valid, so a typo fails in well under a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mgpr.errors import EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, MgprError

USAGE = """usage: mgpr [-cp DIR -cn NAME] [--cfg job] [key=value ...]

Runs a model over every tile of one or more GeoTIFFs on every rank (GPU or CPU) and writes
georeferenced results (GeoPackage) to the run directory. With no input_path it makes a synthetic
orthomosaic with planted objects and checks the whole pipeline against them (offline, CPU).

examples:
  mgpr                                           # quick start: demo image, reference detector
  mgpr input_path=ortho.tif model=fasterrcnn overlap=128 gpus=2
  mgpr input_path=tiles/ model=resnet50 batch_size=32 output_dir=runs/ortho1
  mgpr use_fake_data=true dummy_dataset_delay=0.05 gpus=2   # environment test
  mgpr -cp conf -cn ortho gpus=2                 # conf/ortho.yaml, then gpus=2 on top
  mgpr --cfg job -cp conf -cn ortho tile_size=1024   # print the resolved config, run nothing

flags (Hydra's):
  -cp, --config-path DIR   directory of the config file (default: the current directory)
  -cn, --config-name NAME  read DIR/NAME.yaml (keys as below, `key: value`); key=value wins
  -c, --cfg job            print the resolved config as YAML and exit
  -V, --version            print mgpr's version and its stack's (torch, Lightning, GDAL) and exit
  -m, --multirun           refused: one run per command (one SLURM job per run)

keys (key=default  meaning):"""


def _models_help() -> str:
    """The MODELS section of ``mgpr --help``, from the registry (no torch import)."""
    from mgpr.models.registry import DEFAULT_MODEL, DEMO_MODEL, MODELS

    lines = ["", "MODELS (model=NAME, or an import path pkg.module:build)"]
    marks = {DEFAULT_MODEL: "; the default", DEMO_MODEL: "; the quick start's default"}
    width = max(len(name) for name in MODELS)  # one column, however long a name
    for entry in MODELS.values():
        weights = "downloadable weights" if entry.downloadable else "no weights"
        more = f" ({weights}{marks.get(entry.name, '')})"
        lines.append(f"  {entry.name:<{width}}  {entry.task:<14} {entry.summary}{more}")
    return "\n".join(lines)


def version_line() -> str:
    """``mgpr --version``: mgpr's version and its stack's, for a bug report or a module check.

    From package metadata (no torch import: it answers in well under a second), GDAL's from
    rasterio.
    """
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    import rasterio

    stack = ", ".join(
        f"{name} {version(name)}" for name in ("torch", "torchvision", "lightning", "hydra-core")
    )
    return (
        f"mgpr {version('mgpr')} (Python {platform.python_version()}, {stack}, rasterio "
        f"{rasterio.__version__} with GDAL {rasterio.__gdal_version__}, nvidia-ml-py "
        f"{version('nvidia-ml-py')})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``mgpr``.

    ``argv`` None: this process is the command (its start is the run's start, see
    :func:`~mgpr.monitor.phases.command_start_unix_s`); a list: an in-process call, timed
    from now.
    """
    from mgpr.monitor.phases import command_start_unix_s

    started_unix_s = command_start_unix_s(own_command_line=argv is None)
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-V", "--version") for a in args):
        print(version_line())
        return
    if any(a in ("-h", "--help", "help") for a in args):
        from mgpr.conf.load import describe_keys

        print(USAGE)
        print(describe_keys())
        print(_models_help())
        return
    try:
        from mgpr.conf.command import MULTIRUN_REFUSED, parse_command
        from mgpr.conf.load import config_yaml, explicit_keys, load_config
        from mgpr.models.registry import check_model_name

        inv = parse_command(args)
        if inv.multirun:
            raise ConfigError(MULTIRUN_REFUSED)
        cfg = load_config(inv.overrides, inv.config_path, inv.config_name)
        check_model_name(cfg.model)
        explicit = explicit_keys(inv.overrides, inv.config_path, inv.config_name)
        if inv.cfg == "job":
            from mgpr.run.demo import apply_demo_defaults

            apply_demo_defaults(cfg, explicit)  # the quick start's keys, as the run gets them
            print(config_yaml(cfg), end="")
            return
        if inv.config_file_keys:
            # jobs/job.slurm: its defaults (output_dir, workers, progress) only where unset.
            print("\n".join(sorted(explicit_keys([], inv.config_path, inv.config_name))))
            return
        if inv.slurm_preflight:
            # jobs/job.slurm: check the config against the allocation in the batch shell.
            from mgpr.run.slurm import preflight as slurm_preflight

            slurm_preflight(os.environ, cfg.gpus, cfg.num_nodes, cfg.workers)
            return
        from mgpr.run import quiet_stops

        quiet_stops.install()  # before torch is imported
        from mgpr.run.predict import run

        code = run(cfg, explicit_keys=explicit, started_unix_s=started_unix_s)
    except MgprError as exc:
        if not getattr(exc, "told_by_rank0", False):  # rank 0 printed it for every rank
            print(f"mgpr: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        from mgpr.outputs.rundir import RUN_DIR_ENV, rerun

        print(f"mgpr: interrupted; {rerun(os.environ.get(RUN_DIR_ENV))}", file=sys.stderr)
        sys.exit(130)
    # The run is over, whatever its code: a stop signal while the interpreter shuts down
    # (srun --kill-on-bad-exit TERMs the ranks still alive once one exits 130; scancel while
    # rank 0 merges reaches a rank that has finished) must not turn the code into death by
    # signal (143: the job read FAILED although that rank's work was all kept). Interrupted
    # runs always (as before); others when this is the process's own command line (tests call
    # main() in their process, which must stay stoppable).
    if code == EXIT_INTERRUPTED or argv is None:
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
