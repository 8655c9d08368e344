"""Matplotlib plots of what graphopt measured: cost per block, the pass report, losses.

- :func:`cost_per_block` — FLOPs and bytes per ``jax.named_scope`` (forward and
  backward of a block land together), from :func:`graphopt.analysis.cost_by_scope`.
- :func:`report_table` — a :class:`~graphopt.Report`'s per-pass rows as a table figure.
- :func:`loss_curves` — several training runs' losses on one axis.
- :func:`compare_bars` — baseline vs optimized numbers (time, memory) side by side.

The memory timeline plot lives in :mod:`graphopt.memory` (``graphopt.memory_timeline``).
Every function returns the matplotlib Figure and draws nothing else; it never changes a
program.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from . import analysis, ir
from .errors import require


def _plt():
    return require("matplotlib.pyplot", "viz", "graphopt's plots")


def _closed(f, args) -> ir.ClosedJaxpr:
    from .viz import _as_closed_jaxpr
    return _as_closed_jaxpr(f, args)


def block_costs(f, *args, depth: int = 1) -> dict[str, analysis.ProgramCost]:
    """{scope path: ProgramCost} of ``f`` on ``args`` (or of a ClosedJaxpr / Report)."""
    return analysis.cost_by_scope(_closed(f, args), depth=depth)


def cost_per_block(f, *args, depth: int = 1, top: int | None = 20, title: str | None = None):
    """Horizontal bars of FLOPs and bytes moved per named scope ('' is unscoped code)."""
    costs = block_costs(f, *args, depth=depth)
    items = sorted(costs.items(), key=lambda kv: -kv[1].flops)[:top]
    names = [k or "(unscoped)" for k, _ in items][::-1]
    flops = [c.flops for _, c in items][::-1]
    nbytes = [c.bytes for _, c in items][::-1]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5), sharey=True)
    a1.barh(names, flops, color="#60a5fa")
    a1.set_xlabel("FLOPs")
    a2.barh(names, nbytes, color="#f59e0b")
    a2.set_xlabel("bytes moved (unfused)")
    for ax, vals, fmt in ((a1, flops, analysis.fmt_flops), (a2, nbytes, analysis.fmt_bytes)):
        for y, v in enumerate(vals):
            ax.text(v, y, " " + fmt(v), va="center", fontsize=8)
        ax.margins(x=0.3)
    fig.suptitle(title or f"cost per block of {getattr(f, '__name__', 'program')}")
    fig.tight_layout()
    fig.block_costs = dict(items)
    return fig


def report_table(report, title: str | None = None):
    """The report's per-pass rows (equations, FLOPs, rule hits, ms) as a table figure."""
    rows = report.rows()
    cells = [[r["pass_"], str(r["round"]), f"{r['eqns_before']} → {r['eqns_after']}",
              f"{analysis.fmt_flops(r['flops_before'])} → {analysis.fmt_flops(r['flops_after'])}",
              f"{r['seconds'] * 1e3:.2f}",
              ", ".join(f"{k}×{v}" for k, v in sorted(r["hits"].items()))[:60] or "-"]
             for r in rows]
    cols = ["pass", "round", "equations", "FLOPs", "ms", "rule hits"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(cells) + 1.2))
    ax.axis("off")
    if cells:
        t = ax.table(cellText=cells, colLabels=cols, loc="center", cellLoc="left")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.auto_set_column_width(list(range(len(cols))))
        for (r, _), cell in t.get_celld().items():
            if r > 0 and rows[r - 1]["changed"]:
                cell.set_facecolor("#ecfdf5")
    ax.set_title(title or f"graphopt report: {report.name} "
                 f"({report.eqns_before} → {report.eqns_after} equations)")
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, Sequence[float]], title: str = "training loss",
                xlabel: str = "step", logy: bool = False):
    """Several runs' losses on one axis (e.g. {"jax.jit": [...], "graphopt": [...]})."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(curves.items()):
        ys = [float(y) for y in jax.device_get(list(ys))]
        ax.plot(range(len(ys)), ys, styles[i % len(styles)], label=name, lw=2 if i == 0 else 1.5)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def compare_bars(values: Mapping[str, Mapping[str, float]], title: str = "",
                 fmt=None):
    """Grouped bars: ``{metric: {variant: value}}``, one subplot per metric."""
    plt = _plt()
    metrics = list(values)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    colors = ["#9ca3af", "#34d399", "#60a5fa", "#f59e0b"]
    for ax, m in zip(axes[0], metrics):
        names = list(values[m])
        vals = [float(values[m][n]) for n in names]
        ax.bar(names, vals, color=colors[:len(names)])
        for x, v in enumerate(vals):
            ax.text(x, v, (fmt or {}).get(m, "{:.3g}").format(v) if isinstance(fmt, dict)
                    else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(m)
        ax.margins(y=0.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ = ["block_costs", "cost_per_block", "report_table", "loss_curves", "compare_bars"]
