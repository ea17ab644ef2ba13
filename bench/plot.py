"""One PNG per sweep: throughput (TFLOP/s, GB/s or tokens/s) of every provider that was timed.

A panel per (series, dtype, mode); numeric sweeps (sequence length, width) are lines on a log2 axis,
named ones (model shapes) are grouped bars. Untimed providers (unavailable, failed the check) are
absent from the plot and listed with their reason in the console table and the CSV.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence


def unavailable() -> Optional[str]:
    """Why no plot can be drawn here (matplotlib, from the ``bench`` extra, is not installed), or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install 'fusedformer[bench]')"
    return None


def plot_sweep(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Plot the timed rows of one sweep to ``path``. Returns False when there is nothing to plot."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("throughput")]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    for r in ok:
        panels.setdefault((r.get("_series", ""), r["dtype"], r["mode"]), []).append(r)
    modes = list(dict.fromkeys(k[2] for k in panels))
    groups = list(dict.fromkeys(k[:2] for k in panels))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    unit = ok[0]["unit"]
    height = 3.4 * len(groups) + 0.9  # inches: the panels, then the title and legend above them
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(5.2 * len(modes), height), squeeze=False)
    for gi, (series, dtype) in enumerate(groups):
        for mi, mode in enumerate(modes):
            ax = axes[gi][mi]
            rs = panels.get((series, dtype, mode), [])
            ax.set_title(" | ".join(s for s in (series, dtype, mode) if s), fontsize=9)
            if not rs:
                ax.set_axis_off()
                continue
            numeric = all(isinstance(r.get("_x"), (int, float)) for r in rs)
            xs = list(dict.fromkeys(r["_x"] for r in rs))
            present = [p for p in providers if any(r["provider"] == p for r in rs)]
            if numeric:
                for p in present:
                    pts = sorted((r["_x"], r["throughput"]) for r in rs if r["provider"] == p)
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p, color=colors[p])
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(xs))
                ax.set_xticklabels([str(x) for x in sorted(xs)], fontsize=8)
                ax.set_xlabel(rs[0].get("_xname", ""), fontsize=8)
            else:
                width = 0.8 / max(1, len(present))
                for i, p in enumerate(present):
                    vals = {r["_x"]: r["throughput"] for r in rs if r["provider"] == p}
                    ax.bar([j + i * width for j in range(len(xs))], [vals.get(x, 0.0) for x in xs], width,
                           label=p, color=colors[p])
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))])
                ax.set_xticklabels([str(x) for x in xs], fontsize=8)
            ax.set_ylabel(unit, fontsize=8)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    fig.legend(handles=handles, loc="upper center", ncol=min(len(providers), 8), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True
