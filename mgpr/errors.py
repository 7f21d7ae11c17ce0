"""The one error hierarchy of mgpr.

Every error a user can fix derives from :class:`MgprError`. Its message is one sentence that names
the problem, the value seen and the fix (a config key, an sbatch flag or a command). The CLI catches
``MgprError`` alone, prints that one line to stderr and exits with its ``exit_code``
(:data:`EXIT_USAGE` unless the class says otherwise); anything else is a bug and keeps its
traceback. Subclasses also inherit the matching builtin so callers can catch either (as
rasterio's ``RasterioIOError(RasterioError, OSError)`` does).
"""

from __future__ import annotations

#: Exit code for a user mistake caught before or during the run (bad config, bad input).
EXIT_USAGE = 2
#: Exit code for a run that finished but recorded failed tiles (``failed_tiles`` in the summary).
EXIT_TILES_FAILED = 3
#: Exit code for a run whose merge found planned tiles in no published part (``missing_tiles.txt``).
EXIT_TILES_MISSING = 4
#: Exit code for a run stopped by SIGTERM/SIGINT/SIGUSR1; everything written so far is kept.
EXIT_INTERRUPTED = 130


class RunInterrupted(BaseException):
    """Raised in the main thread by SIGTERM / SIGUSR1 / SIGINT: stop, keep what is written.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` on the way swallows the
    stop; here (not in ``run/signals``) so the monitor can tell a stopped rank from a failed one.
    """


class MgprError(Exception):
    """Root of every error a user can fix; its message is a single line."""

    #: The process exit code the CLI uses for this error.
    exit_code: int = EXIT_USAGE


class ConfigError(MgprError, ValueError):
    """Raised when a config key is unknown or a value is out of range or of the wrong type."""


class InputError(MgprError, FileNotFoundError):
    """Raised when an input path is missing, empty, or not a readable raster."""


class ModelError(MgprError, ValueError):
    """Raised when a model name, import path, checkpoint or weights cannot be used."""


class OutputError(MgprError, OSError):
    """Raised when the output exists from another run, or cannot be written."""


class ResourceError(MgprError, RuntimeError):
    """Raised when a rank runs out of (GPU or host) memory; names the key to lower."""


class SlurmMismatchError(MgprError, RuntimeError):
    """Raised when the mgpr config disagrees with the SLURM allocation (tasks, GPUs, CPUs)."""


class RankJoinError(MgprError, RuntimeError):
    """Raised when not every rank joins the process group within ``join_timeout_s``."""


class RankFailedError(MgprError, RuntimeError):
    """Raised on a surviving rank when another rank died before the end-of-predict barrier."""


class MissingTilesError(MgprError, RuntimeError):
    """Raised after the merge when planned tiles are in no published part (exit code 4)."""

    exit_code = EXIT_TILES_MISSING


class WorkerFailedError(MgprError, RuntimeError):
    """Raised when a DataLoader worker raised outside a tile read (reads fail per tile)."""
