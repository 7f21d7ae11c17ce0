"""Where a command's time went: start-up, the predict loop, merge and outputs.

On real runs the predict loop is often the smaller part (a 24 s run: start-up 7.5 s, predict
6.1 s, merge and previews 7.7 s), so the report and the summary split the command in three at
two wall-clock stamps (seconds since the epoch, rank 0's clock; ranks on other nodes are
assumed NTP-synchronised)::

    start-up          = command start          -> earliest rank's predict loop start
    predict           = that                   -> latest rank's predict loop end
    merge and outputs = that                   -> ``end`` (the report's build, or the summary)

The command starts at the process start (:func:`command_start_unix_s`), before Python's imports.
Pure arithmetic apart from that one function; no torch, no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

#: The phases' keys in ``report.json`` / ``summary.json`` ``phases``, in order, with the label
#: the summary's ``time`` line gives each.
PHASE_LABELS = {
    "startup_s": "start-up",
    "predict_s": "predict",
    "merge_outputs_s": "merge and outputs",
}


def command_start_unix_s(own_command_line: bool) -> float:
    """When the command started, seconds since the epoch.

    Args:
        own_command_line: True when this process IS the command (the console script,
            ``python -m mgpr.cli.main``): its start (the kernel's, 10 ms ticks; psutil where
            ``/proc`` is missing), so the interpreter and the imports count. False for an
            in-process call (``main([...])`` from a test or a notebook): now.
    """
    now = time.time()
    if not own_command_line:
        return now
    started = _proc_start_unix_s(now)
    if started is None:
        try:
            import psutil

            started = float(psutil.Process().create_time())
        except Exception:  # noqa: BLE001 - a sandbox: the call time is the best known
            return now
    return started if started <= now else now


def _proc_start_unix_s(now: float) -> float | None:
    """This process's start from ``/proc`` (Linux): ``now - (uptime - starttime)``, seconds.

    Preferred to psutil's ``create_time``, which adds the start to the boot time of
    ``/proc/stat`` ``btime``, whole seconds (up to 1 s early). None where ``/proc`` is absent.
    """
    import os

    try:
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime_s = float(fh.read().split()[0])
        with open("/proc/self/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        return now - (uptime_s - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def loop_span(parts: Iterable[Mapping[str, Any]]) -> tuple[float, float] | None:
    """(earliest predict loop start, latest loop end) over the ranks' report parts, unix s.

    A part's loop runs from ``predict_start_unix_s`` for ``wall_s`` seconds. None when no
    part has a start (no rank ran its loop: every tile finished by an earlier run).
    """
    spans = [
        (float(p["predict_start_unix_s"]), float(p["predict_start_unix_s"]) + float(p["wall_s"]))
        for p in parts
        if p.get("predict_start_unix_s") is not None and p.get("wall_s") is not None
    ]
    if not spans:
        return None
    return min(s for s, _ in spans), max(e for _, e in spans)


def run_phases(
    command_start: float, loop: tuple[float, float] | None, end: float
) -> dict[str, float] | None:
    """The three phases (module docstring), seconds, rounded to ms; they sum to ``end - start``.

    Stamps are clamped into order (a rank's clock a little off cannot make a phase negative).
    None without a loop span.
    """
    if loop is None:
        return None
    end = max(end, command_start)
    loop_start = min(max(loop[0], command_start), end)
    loop_end = min(max(loop[1], loop_start), end)
    return {
        "startup_s": round(loop_start - command_start, 3),
        "predict_s": round(loop_end - loop_start, 3),
        "merge_outputs_s": round(end - loop_end, 3),
    }


def phases_line(phases: Mapping[str, float]) -> str:
    """``start-up 7.5 s, predict 6.1 s, merge and outputs 7.7 s`` (the summary's ``time`` line)."""
    return ", ".join(f"{label} {float(phases[key]):.1f} s" for key, label in PHASE_LABELS.items())
