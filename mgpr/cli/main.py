"""Entry point of ``mgpr``: ``key=value`` overrides in, exit code out.

Expected mistakes (:class:`~mgpr.errors.MgprError`) become one line on stderr and exit code 2;
anything else is a bug and keeps its traceback. Heavy imports (torch, Lightning) happen only
after the config is valid, so a typo fails in well under a second.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mgpr.errors import EXIT_INTERRUPTED, EXIT_USAGE, MgprError

USAGE = """usage: mgpr [key=value ...]

Runs a model over every tile of one or more GeoTIFFs on every rank (GPU or CPU) and writes
georeferenced results (GeoPackage) to the run directory. With no input_path it makes a synthetic
orthomosaic with planted objects and checks the whole pipeline against them (offline, CPU).

examples:
  mgpr                                           # quick start: demo image, reference detector
  mgpr input_path=ortho.tif model=fasterrcnn overlap=128 gpus=2
  mgpr input_path=tiles/ model=resnet50 batch_size=32 output_dir=runs/ortho1
  mgpr use_fake_data=true dummy_dataset_delay=0.05 gpus=2   # environment test

keys (key=default  meaning):"""


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``mgpr``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        from mgpr.conf.load import describe_keys

        print(USAGE)
        print(describe_keys())
        return
    # jobs/job.slurm: check the config against the allocation in the batch shell (no torch).
    preflight = args[:1] == ["--slurm-preflight"]
    if preflight:
        args = args[1:]
    try:
        from mgpr.conf.load import load_config

        cfg = load_config(args)
        if preflight:
            import os

            from mgpr.run.slurm import preflight as slurm_preflight

            slurm_preflight(os.environ, cfg.gpus, cfg.num_nodes, cfg.workers)
            return
        explicit = {a.split("=", 1)[0].lstrip("+~") for a in args}
        from mgpr.run.predict import run

        code = run(cfg, explicit_keys=explicit)
    except MgprError as exc:
        print(f"mgpr: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("mgpr: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    if code == EXIT_INTERRUPTED:
        # A second stop signal while the interpreter shuts down (srun --kill-on-bad-exit TERMs
        # the ranks still alive once one rank exits 130) must not turn 130 into death by signal.
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
