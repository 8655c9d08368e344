"""Memory timelines and Pareto curves for rematerialization (plots with matplotlib).

- :func:`memory_timeline` — estimated live bytes per top-level equation of a program
  (and of its graphopt-optimized version), with recomputed equations (scope ``remat``)
  marked, plus XLA's own temp figure for each; ``plot=True`` draws it.
- :func:`pareto` — for a list of budgets, what ``graphopt.optimize(fn,
  memory_budget=b)`` reaches: XLA temp bytes and FLOPs recomputed; :func:`plot_pareto`
  draws bytes against FLOPs.

Reads programs; rewrites nothing itself. XLA CPU figures need
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` set before JAX
starts (see :func:`graphopt.analysis.memory_aware_scheduler_flag`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

import jax

from . import analysis, ir
from .errors import require


@dataclasses.dataclass
class Timeline:
    label: str
    live_bytes: np.ndarray        # estimated temp bytes live after each top-level equation
    recomputed: list              # indices of recomputing equations (scope 'remat')
    xla_temp_bytes: int | None    # XLA's temp_size_in_bytes of the program


def _is_recompute(eqn) -> bool:
    return ir.name_stack(eqn).split("/")[0] == "remat"


def timeline_of(cj: ir.ClosedJaxpr, label: str = "", xla: bool = True) -> Timeline:
    """:class:`Timeline` of a closed jaxpr (XLA figure compiled for its input avals)."""
    live = analysis.memory_timeline(cj, at="during")
    top = analysis.top_level(cj)
    rec = [i for i, e in enumerate(top.eqns) if _is_recompute(e)]
    temp = None
    if xla:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cj.in_avals]
        temp = analysis.xla_memory(cj, *specs)["temp_bytes"]
    return Timeline(label, live, rec, temp)


def memory_timeline(fn, *args, plot: bool = True, ax=None, xla: bool = True, **kwargs):
    """Live bytes per step of ``fn(*args)``; before/after when ``fn`` is graphopt-optimized.

    ``fn``: a plain function, a ``graphopt.optimize`` result (its original and optimized
    programs are both shown) or a ClosedJaxpr. Returns a list of :class:`Timeline`
    (and draws them on ``ax``, or a new figure, when ``plot``).
    """
    if plot:  # say what is missing before the compiles, not after
        require("matplotlib.pyplot", "viz", "graphopt.memory_timeline")
    lines = []
    if isinstance(fn, ir.ClosedJaxpr):
        lines.append(timeline_of(fn, "program", xla))
    elif hasattr(fn, "original_jaxpr") and hasattr(fn, "jaxpr"):
        lines.append(timeline_of(fn.original_jaxpr(*args, **kwargs), "original", xla))
        lines.append(timeline_of(fn.jaxpr(*args, **kwargs), "optimized", xla))
    else:
        lines.append(timeline_of(jax.make_jaxpr(fn)(*args, **kwargs), "program", xla))
    if plot:
        plot_timelines(lines, ax=ax)
    return lines


def plot_timelines(lines, ax=None, title: str = "live temporaries per equation (estimate)"):
    """Draw :class:`Timeline` s: one line each, recomputations marked with 'x'."""
    plt = require("matplotlib.pyplot", "viz", "graphopt.memory_timeline")
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    for t in lines:
        mib = t.live_bytes / 2**20
        lab = t.label
        if t.xla_temp_bytes is not None:
            lab += f" (XLA temp {analysis.fmt_bytes(t.xla_temp_bytes)})"
        (ln,) = ax.plot(np.arange(len(mib)), mib, label=lab, lw=1.2)
        if t.recomputed:
            ax.plot(t.recomputed, mib[t.recomputed], "x", color=ln.get_color(), ms=7,
                    label=f"{t.label}: recomputation")
    ax.set_xlabel("equation (schedule order)")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def pareto(fn, *args, budgets=(1.0, 0.75, 0.5, 0.25), solver: str = "auto",
           options: dict | None = None, **kwargs) -> list:
    """Budget -> measured XLA temp bytes and FLOPs recomputed, via the post-AD pass.

    ``options``: more remat pass options, e.g. ``{"remat_micro_batches": False}`` for the
    curve of choosing what to keep alone.

    ``fn`` is a whole training step (its jaxpr holds the backward). Each row: budget
    (as given), budget_bytes, xla_temp_bytes, flops_recomputed, solver, error (the
    message when the budget is infeasible, else None). A Pareto curve: where the plan
    found for a tighter budget uses no more memory and fewer FLOPs than a looser budget's
    (each budget is solved on its own, under a model calibrated by a few compiles), the
    looser budget's row takes it, and its solver says so.
    """
    from .passes import PassContext
    from graphopt.transforms import remat as _remat  # noqa: F401  (registers the pass)
    from graphopt.passes import resolve
    cj = jax.make_jaxpr(fn)(*args, **kwargs)
    base = _remat.xla_temp(cj)
    rows = []
    for b in budgets:
        bb = _remat.parse_budget(b, base)
        row = {"budget": b, "budget_bytes": bb, "xla_temp_bytes": base,
               "flops_recomputed": 0.0, "solver": None, "error": None}
        try:
            res = resolve("remat")[0](cj, PassContext("post-AD", {
                "memory_budget": b, "remat_solver": solver, **(options or {})}))
            if res.changed:
                row["xla_temp_bytes"] = _remat.xla_temp(res.jaxpr)
                row["flops_recomputed"] = float(res.stats.hits.get("remat.flops_recomputed", 0))
                row["solver"] = next((n.split("solver ")[1].split(" (")[0]
                                      for n in res.stats.notes if "solver " in n), None) or (
                    f"micro-batches x{res.stats.hits['remat.micro_batches']}"
                    if "remat.micro_batches" in res.stats.hits else None)
        except _remat.BudgetError as exc:
            row["error"] = str(exc)
        rows.append(row)
    best = None  # the cheapest measured plan so far, tightest budget first
    for row in sorted(rows, key=lambda r: r["budget_bytes"]):
        if row["error"] is not None:
            continue
        if (best is not None and best["flops_recomputed"] < row["flops_recomputed"]
                and best["xla_temp_bytes"] <= row["xla_temp_bytes"]):  # dominated
            row.update(xla_temp_bytes=best["xla_temp_bytes"],
                       flops_recomputed=best["flops_recomputed"],
                       solver=f"{best['solver']} (plan of budget {best['budget']})")
        else:
            best = row
    return rows


def plot_pareto(rows, ax=None, label: str = "graphopt", others=None):
    """XLA temp MiB against recomputed GFLOP; ``others``: {name: (bytes, flops)} points."""
    plt = require("matplotlib.pyplot", "viz", "graphopt.pareto plots")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ok = [r for r in rows if r["error"] is None]
    ax.plot([r["flops_recomputed"] / 1e9 for r in ok], [r["xla_temp_bytes"] / 2**20 for r in ok],
            "o-", label=label)
    for name, (b, f) in (others or {}).items():
        ax.plot([f / 1e9], [b / 2**20], "s", label=name)
    ax.set_xlabel("recomputed GFLOP")
    ax.set_ylabel("XLA temp MiB")
    ax.legend(fontsize=8)
    return ax


__all__ = ["Timeline", "memory_timeline", "timeline_of", "plot_timelines", "pareto",
           "plot_pareto"]
