"""The report's picture, ``report.png``: memory and utilisation over time, time split per rank.

matplotlib is imported (Agg backend) only inside :func:`plot_report`, so importing the report
costs nothing on ranks that never draw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GIB = float(2**30)


def plot_report(
    parts: Mapping[int, Mapping[str, Any]], rows: list[dict[str, Any]], path: Path
) -> None:
    """Draw memory (and utilisation) over time per rank and the time split per rank to ``path``.

    GPU runs: NVML memory used (GiB) and utilisation (%) per GPU over time. CPU runs: host RSS
    per rank. Bottom panel: share of wall time per rank spent on data wait, compute, stages and
    the rest. Written via a temp file and ``os.replace``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_rank = {r["global_rank"]: r for r in rows}
    has_util = any(r["util_avg_pct"] is not None for r in rows)
    n_axes = 3 if has_util else 2
    fig, axes = plt.subplots(n_axes, 1, figsize=(10, 3.2 * n_axes), dpi=100)
    try:
        ax_mem = axes[0]
        ax_util = axes[1] if has_util else None
        ax_bar = axes[-1]
        field = {"gpu": "mem_used_bytes", "torch_reserved": "torch_reserved_bytes"}
        kinds = set()
        for rank in sorted(parts):
            samples = parts[rank].get("samples") or {}
            row = by_rank[rank]
            kinds.add(row["memory_kind"])
            label = f"rank {rank} {row['device']} @ {row['hostname']}"
            t = samples.get("t_s") or []
            mem = samples.get(field.get(row["memory_kind"], "rss_bytes")) or []
            pts = [(a, b / GIB) for a, b in zip(t, mem, strict=False) if b is not None]
            if pts:
                ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.2)
            if ax_util is not None:
                util = samples.get("util_pct") or []
                upts = [(a, b) for a, b in zip(t, util, strict=False) if b is not None]
                if upts:
                    ax_util.plot([p[0] for p in upts], [p[1] for p in upts], label=label, lw=1.2)
        what = "host RSS per rank" if kinds == {"host_rss"} else "GPU memory used per GPU"
        ax_mem.set_title(what)
        ax_mem.set_ylabel("GiB")
        ax_mem.set_xlabel("time since predict start (s)")
        ax_mem.grid(alpha=0.3)
        if len(parts) <= 16:
            ax_mem.legend(fontsize=7, loc="best")
        if ax_util is not None:
            ax_util.set_title("GPU utilisation (NVML: share of time a kernel ran)")
            ax_util.set_ylabel("%")
            ax_util.set_ylim(0, 105)
            ax_util.set_xlabel("time since predict start (s)")
            ax_util.grid(alpha=0.3)
        names = [f"r{r['global_rank']}" for r in rows]
        xs = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        stage_names = sorted({k for r in rows for k in r["stage_shares"]})
        series: list[tuple[str, list[float], str | None]] = [
            ("data wait", [r["data_wait_share"] for r in rows], "tab:red")
        ]
        series.append(("compute", [r["compute_share"] for r in rows], "tab:green"))
        for name in stage_names:
            series.append((name, [r["stage_shares"].get(name, 0.0) for r in rows], None))
        used = [sum(s[1][i] for s in series) for i in xs]
        series.append(("other", [max(0.0, 1.0 - u) for u in used], "lightgrey"))
        for label, values, color in series:
            pct = [100.0 * v for v in values]
            ax_bar.bar(xs, pct, bottom=bottom, label=label, color=color)
            bottom = [b + p for b, p in zip(bottom, pct, strict=True)]
        ax_bar.set_xticks(xs, names)
        ax_bar.set_ylabel("% of wall time")
        ax_bar.set_ylim(0, 118)
        ax_bar.set_title("time split per rank (data wait = waiting for tiles)")
        ax_bar.legend(fontsize=7, loc="upper right", ncol=len(series))
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)
