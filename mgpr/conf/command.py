"""The ``mgpr`` command line: Hydra's own flags around ``key=value`` overrides.

The flags are spelt as a Hydra app's (``hydra/_internal/utils.py: get_args_parser``), so a Hydra
user's habits work: ``-cp/--config-path DIR`` and ``-cn/--config-name NAME`` (also
``--config-name=NAME``) read ``DIR/NAME.yaml``, ``-c/--cfg job`` prints the resolved config,
``-m/--multirun`` is refused (see :data:`MULTIRUN_REFUSED`). What the config *means* is Hydra's
compose API (:func:`mgpr.conf.load.load_config`); this module only splits the command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from mgpr.errors import ConfigError

#: ``-m/--multirun``: why not, and what to do instead (one line, exit code 2).
MULTIRUN_REFUSED = (
    "--multirun/-m is not supported: mgpr is one run per command (on a cluster, one SLURM job, "
    "whose ranks all run the same config); start one run per value instead, e.g. "
    "`for t in 256 512; do sbatch jobs/job.slurm tile_size=$t output_dir=runs/t$t; done`"
)

#: Hydra app flags mgpr has no use for: the flag -> why, with what to use instead.
_UNSUPPORTED = {
    "--hydra-help": "mgpr --help lists every key",
    "--info": "use --cfg job to see the config",
    "--run": "mgpr always runs one job",
    "--shell-completion": "mgpr has no shell completion",
    "--config-dir": "use -cp DIR -cn NAME",
    "--package": "keys are flat; use --cfg job",
    "--experimental-rerun": "re-run the same command to resume",
}


@dataclass(frozen=True, slots=True)
class Invocation:
    """One ``mgpr`` command line, split.

    Attributes:
        overrides: the ``key=value`` arguments, in order (later ones win).
        config_path: ``-cp/--config-path``: the directory of the config file, as given
            (relative to the current directory), or None.
        config_name: ``-cn/--config-name``: the file's name, ``.yaml`` optional, or None.
        cfg: ``-c/--cfg``: ``"job"`` to print the resolved config and run nothing, or None.
        multirun: ``-m/--multirun`` was given (refused by the CLI with :data:`MULTIRUN_REFUSED`).
        help: ``-h/--help`` (or a bare ``help``).
        slurm_preflight: ``--slurm-preflight``: check the config against the SLURM allocation
            of the batch shell and exit (``jobs/job.slurm`` runs this before ``srun``).
        config_file_keys: ``--config-file-keys``: print the keys the config file sets, one a
            line, and exit (``jobs/job.slurm`` adds its defaults only for keys set nowhere).
    """

    overrides: tuple[str, ...] = ()
    config_path: str | None = None
    config_name: str | None = None
    cfg: str | None = None
    multirun: bool = False
    help: bool = False
    slurm_preflight: bool = False
    config_file_keys: bool = False


class _Parser(argparse.ArgumentParser):
    """argparse with one-line :class:`ConfigError` instead of usage text and ``exit(2)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; usage: {USAGE_LINE}")


#: The synopsis, also the end of every command-line error.
USAGE_LINE = "mgpr [-cp DIR -cn NAME] [--cfg job] [key=value ...]"


def _parser() -> _Parser:
    parser = _Parser(prog="mgpr", add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--config-path", "-cp", dest="config_path")
    parser.add_argument("--config-name", "-cn", dest="config_name")
    parser.add_argument("--cfg", "-c", dest="cfg")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--help", "-h", action="store_true")
    parser.add_argument("--resolve", action="store_true")  # Hydra's; mgpr always resolves
    parser.add_argument("--slurm-preflight", action="store_true")
    parser.add_argument("--config-file-keys", action="store_true")
    parser.add_argument("overrides", nargs="*")
    return parser


def parse_command(argv: Sequence[str]) -> Invocation:
    """Split an ``mgpr`` command line into flags and overrides.

    Raises:
        ConfigError: an unknown flag, a flag without its value, or ``--cfg`` other than ``job``.
    """
    args = list(argv)
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _UNSUPPORTED:
            raise ConfigError(f"{flag} is a Hydra flag mgpr does not use: {_UNSUPPORTED[flag]}")
        if arg.startswith("-") and flag not in _FLAGS:
            name = flag.lstrip("-").replace("-", "_")
            if name in _config_keys():
                at = args.index(arg)
                value = (
                    arg.split("=", 1)[1] if "=" in arg else (args[at + 1 : at + 2] or ["..."])[0]
                )
                raise ConfigError(
                    f"unknown option {arg!r}: config keys are key=value overrides without dashes; "
                    f"write `mgpr {name}={value}`"
                )
            raise ConfigError(
                f"unknown option {arg!r} (flag and value are two arguments: -cp DIR); "
                f"usage: {USAGE_LINE}"
            )
    try:
        ns = _parser().parse_intermixed_args(args)
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err}; usage: {USAGE_LINE}") from None
    if ns.cfg is not None and ns.cfg != "job":
        raise ConfigError(
            f"--cfg {ns.cfg}: mgpr prints only the job's config; use --cfg job "
            "(mgpr does not use Hydra's own settings)"
        )
    overrides = [o for o in ns.overrides if o != "help"]
    return Invocation(
        overrides=tuple(overrides),
        config_path=ns.config_path,
        config_name=ns.config_name,
        cfg=ns.cfg,
        multirun=ns.multirun,
        help=ns.help or len(overrides) != len(ns.overrides),
        slurm_preflight=ns.slurm_preflight,
        config_file_keys=ns.config_file_keys,
    )


def _config_keys() -> set[str]:
    from mgpr.conf.load import config_keys

    return set(config_keys())


_FLAGS = frozenset(
    {
        "--config-path",
        "-cp",
        "--config-name",
        "-cn",
        "--cfg",
        "-c",
        "--multirun",
        "-m",
        "--help",
        "-h",
        "--resolve",
        "--slurm-preflight",
        "--config-file-keys",
    }
)
