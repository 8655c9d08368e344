"""Solvers choosing which forward segments to rematerialize under a byte target.

Each minimizes recomputed FLOPs subject to :meth:`.plan.Plan.model_bytes` <= target,
takes the same plain arguments ``(plan, target, time_limit)`` and returns a
:class:`.solution.Solution` (what ran, seconds, the choice, model bytes, FLOPs):

- :func:`.milp.solve_milp`: exact integer program (scipy's ``milp`` / HiGHS).
- :func:`.greedy.solve_greedy`: the fast heuristic, a DP over the chain of pieces
  checked with the exact byte model, then trimmed and improved by local search.

:func:`solve` picks one by name (option ``remat_solver``).
"""
from __future__ import annotations

from .greedy import solve_greedy
from .milp import solve_milp
from .plan import Plan
from .solution import Solution

# name -> solver(plan, target, time_limit) -> Solution
SOLVERS = {"milp": solve_milp, "greedy": solve_greedy}


def solve(plan: Plan, target: int, solver: str = "auto", time_limit: float = 10.0,
          milp_max_segments: int = 400) -> Solution:
    """'milp', 'greedy', or 'auto' (milp up to ``milp_max_segments``, else greedy)."""
    if solver != "auto" and solver not in SOLVERS:
        raise ValueError(f"remat: unknown solver {solver!r}; use 'auto', 'milp' or 'greedy'")
    if solver == "auto":
        solver = "greedy" if len(plan.segments) > milp_max_segments else "auto"
    if solver == "greedy":
        return SOLVERS["greedy"](plan, target, time_limit)
    sol = SOLVERS["milp"](plan, target, time_limit)
    if not sol.feasible:  # the smallest plan the heuristic finds, for the caller to measure
        g = SOLVERS["greedy"](plan, target, time_limit)
        g.solver = "greedy (milp: " + sol.status.split(".")[0] + ")"
        return g
    if solver == "auto":  # the heuristic can only help where milp hit its time limit
        g = SOLVERS["greedy"](plan, target, time_limit)
        if g.feasible and (not sol.feasible or g.flops < sol.flops):
            g.solver = "greedy (milp: " + sol.status + ")"
            return g
    return sol


__all__ = ["Solution", "SOLVERS", "solve", "solve_milp", "solve_greedy"]
