"""The remat pass's budget: reading it, measuring programs against it, and calibrating
the plan's byte model to XLA's figure (:func:`choose`), for the post-AD ladder
(:mod:`.ladder`), its micro-batches (:mod:`.micro`) and pre-AD placement
(:mod:`.pre_ad`)."""
from __future__ import annotations

import contextlib
import contextvars

import jax

from graphopt import analysis, ir, progress
from graphopt.errors import BudgetError
from graphopt.options import parse_budget
from graphopt.interpreter import Stats
from graphopt.passes import PassResult

from .plan import Plan
from .solvers import solve, solve_greedy

# A program measuring up to this fraction over the budget meets it: XLA's figure moves
# by a few percent with scheduling details no plan controls.
TOLERANCE = 0.05


def within(mem: float, budget_bytes: int) -> bool:
    """Whether a measured ``mem`` meets ``budget_bytes`` (up to :data:`TOLERANCE` over)."""
    return mem <= budget_bytes * (1 + TOLERANCE)


# ----------------------------------------------------------------------- calibration

# The flat inputs' shardings while a remat pass runs on a program whose inputs live on
# several devices: XLA then compiles the SPMD program and its figures are per device.
_PLACEMENT: contextvars.ContextVar = contextvars.ContextVar("graphopt_remat_placement",
                                                           default=None)


def devices_of(ctx) -> int:
    """How many devices the sharded inputs span (1: measured as one program)."""
    shardings = getattr(ctx, "in_shardings", None) or ()
    return max((len(s.device_set) for s in shardings if s is not None), default=1)


@contextlib.contextmanager
def per_device(ctx):
    """Measure programs placed as ``ctx.in_shardings`` says (budgets are per device)."""
    token = _PLACEMENT.set(getattr(ctx, "in_shardings", None) if devices_of(ctx) > 1 else None)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def specs(cj) -> list:
    """Abstract inputs of ``cj`` to compile it on, placed like the pass's inputs where the
    program takes those inputs (a sub-program with other inputs compiles unplaced)."""
    placed = _PLACEMENT.get()
    if placed is None or len(placed) != len(cj.in_avals):
        placed = [None] * len(cj.in_avals)
    return [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False),
                                 sharding=s) for a, s in zip(cj.in_avals, placed)]


def xla_temp(cj: ir.ClosedJaxpr) -> int:
    """XLA's temp bytes of a closed jaxpr compiled for its input avals."""
    return analysis.xla_memory(cj, *specs(cj))["temp_bytes"]


def estimated_temp(cj: ir.ClosedJaxpr) -> int:
    """graphopt's own liveness estimate (no compile; option remat_measure='estimate')."""
    return int(analysis.peak_memory(cj)[0])


MEASURES = {"xla": xla_temp, "estimate": estimated_temp}


def next_target(points, budget_bytes: int, model: float, mem: int):
    """The model target to solve for next, from the (model bytes, measured bytes) so far.

    XLA's figure moves with the model's but not one to one (GPT on a GPU: 0.3-0.4 measured
    bytes per model byte), so a step by the measured excess alone needs many compiles.
    With a bracket (a plan under the budget, one over) interpolate between its two
    nearest points; else step along the slope of the last two points, aiming at the
    budget. ``model``/``mem``: the last plan's. None when nothing is left.
    """
    under = [p for p in points if p[1] <= budget_bytes]
    over = [p for p in points if p[1] > budget_bytes]
    if under and over:
        lo = max(under)                    # most model bytes that still fit
        hi = min(over)                     # fewest model bytes that did not
        if hi[0] <= lo[0]:
            return None                    # not monotone here: the best found stands
        t = lo[0] + (hi[0] - lo[0]) * (budget_bytes - lo[1]) / (hi[1] - lo[1])
        return min(max(t, lo[0] + 0.1 * (hi[0] - lo[0])), hi[0] - 0.1 * (hi[0] - lo[0]))
    slope = 1.0                            # no evidence yet: one model byte per measured byte
    if len(points) >= 2:
        (m1, x1), (m2, x2) = points[-2], points[-1]
        if m1 != m2 and (x2 - x1) / (m2 - m1) > 0.05:
            slope = (x2 - x1) / (m2 - m1)
    if over:                               # over budget so far: tighten (0: least memory)
        return max(0.0, model - (mem - budget_bytes) / slope)
    return model + (budget_bytes - mem) / slope  # under budget: loosen to recompute less


def choose(plan: Plan, build, measure, budget_bytes: int, base_mem: int, *, solver="auto",
           tolerance: float = TOLERANCE, max_compiles: int = 6, time_limit: float = 10.0,
           stats: Stats | None = None, known: dict | None = None, anchor=None):
    """Pick a plan whose measured memory is <= budget * (1 + tolerance), fewest FLOPs.

    ``build(remat) -> program``, ``measure(program) -> bytes``. Calibrates the byte model
    target against the measured figures (:func:`next_target`; at most ``max_compiles``
    compiles). ``anchor``: (model bytes, measured bytes) of a plan already measured. Returns
    (program, solution, measured bytes); raises :class:`BudgetError` when unreachable.
    """
    stats = stats if stats is not None else Stats()
    m_none = plan.model_bytes([False] * len(plan.segments))
    limit = budget_bytes * (1 + tolerance)
    # (model bytes, measured bytes) known so far: no remat, and the least-memory plan if
    # the caller measured it (then the first target interpolates between the two)
    points: list = [(m_none, base_mem)] + ([tuple(anchor)] if anchor is not None else [])
    target = next_target(points, budget_bytes, m_none, base_mem)
    if target is None:
        target = budget_bytes - (base_mem - m_none)
    best = None
    tried: dict = {}
    known = dict(known or {})  # plan -> measured bytes, already compiled by the caller
    with progress.bar(max_compiles, "remat: calibrate", leave=False) as pbar:
        for _ in range(max_compiles):
            sol = solve(plan, int(target), solver, time_limit)
            key = tuple(sol.remat)
            if key not in tried:
                prog = build(sol.remat)
                tried[key] = (prog, known[key] if key in known else measure(prog))
                points.append((sol.model_bytes, tried[key][1]))
                pbar.update()
            prog, mem = tried[key]
            stats.note(f"remat: {sol.solver} in {sol.seconds * 1e3:.1f} ms for model target "
                       f"{analysis.fmt_bytes(target)}: {sum(sol.remat)}/{len(sol.remat)} segments,"
                       f" XLA temp {analysis.fmt_bytes(mem)}")
            if mem <= limit:
                if best is None or sol.flops < best[1].flops:
                    best = (prog, sol, mem)
                if mem >= 0.9 * budget_bytes:
                    break
            nxt = next_target(points, budget_bytes, sol.model_bytes, mem)
            if nxt is None or abs(nxt - target) < 1024:
                break
            target = nxt
    if best is not None:
        return best
    # Unreachable: report the smallest feasible budget (the least-memory plan, measured).
    sol = solve_greedy(plan, 0)
    key = tuple(sol.remat)
    if key not in tried:
        prog = build(sol.remat)
        tried[key] = (prog, known[key] if key in known else measure(prog))
    floor = min(m for _, m in tried.values())
    if floor <= limit:
        prog, mem = min(tried.values(), key=lambda t: t[1])
        return prog, sol, mem
    raise infeasible(budget_bytes, floor, base_mem)


def infeasible_msg(budget_bytes: int, floor: int, base_mem: int) -> str:
    """The :class:`BudgetError` message: the smallest feasible budget, in bytes."""
    return (f"remat: memory_budget of {budget_bytes} bytes ({analysis.fmt_bytes(budget_bytes)}) "
            f"is below what rematerialization reaches: the smallest feasible budget is {floor} "
            f"bytes ({analysis.fmt_bytes(floor)}); without remat the program needs {base_mem} bytes")


def infeasible(budget_bytes: int, floor: int, base_mem: int, why: str = "") -> BudgetError:
    """The :class:`BudgetError` for a budget below ``floor``, its figures as attributes."""
    return BudgetError(infeasible_msg(budget_bytes, floor, base_mem) + why,
                       budget_bytes=budget_bytes, floor_bytes=floor, base_bytes=base_mem)


def finish(prog, stats, how, base, mem, budget_bytes, flops) -> PassResult:
    """The pass's result ``prog``, what it did and saved written into its notes and hits."""
    stats.note(f"remat: {how}; XLA temp {analysis.fmt_bytes(base)} -> "
               f"{analysis.fmt_bytes(mem)} (saved {analysis.fmt_bytes(base - mem)}) for budget "
               f"{analysis.fmt_bytes(budget_bytes)}; recomputes {analysis.fmt_flops(flops)}")
    stats.hit("remat.flops_recomputed", int(flops))
    stats.hit("remat.bytes_saved", int(base - mem))
    return PassResult(prog, True, stats)


__all__ = ["TOLERANCE", "within", "per_device", "devices_of", "specs", "parse_budget", "xla_temp",
           "estimated_temp", "MEASURES", "BudgetError",
           "next_target", "choose", "infeasible_msg", "infeasible", "finish"]
