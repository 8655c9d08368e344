"""The exact remat solver (:func:`solve_milp`): an integer program under the byte model.

An exact integer program in the style of Checkmate (scipy's ``milp`` / HiGHS, with a
time limit). Binary r_s per segment (recompute it), k_v in
[0, 1] per value (it persists: a residual of a kept segment or a live-in of a
recomputed one), M >= the largest recomputed segment's residual bytes.
"""
from __future__ import annotations

import time

import numpy as np

from .plan import Plan
from .solution import Solution, solution


def solve_milp(plan: Plan, target: int, time_limit: float = 10.0) -> Solution:
    """Exact minimum-FLOP choice under the byte model (scipy.optimize.milp, HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    segs = plan.segments
    n = len(segs)
    pinned = set(plan.pinned)
    values, index = [], {}
    for s in segs:
        for v in list(s.outputs) + list(s.liveins):
            if v not in index and v not in pinned:
                index[v] = len(values)
                values.append(v)
    m = len(values)
    nv = n + m + 1                      # r_s, k_v, M
    c = np.zeros(nv)
    c[:n] = [s.flops + 1.0 for s in segs]  # +1: among equal-FLOP choices recompute least
    ri, ci, vals, lo, hi = [], [], [], [], []
    row = 0

    def add(entries, l, h):
        nonlocal row
        for j, x in entries:
            ri.append(row)
            ci.append(j)
            vals.append(x)
        lo.append(l)
        hi.append(h)
        row += 1
    covers: dict = {}
    for si, s in enumerate(segs):
        for v in s.outputs:
            covers.setdefault(v, []).append(si)
    for v, sis in covers.items():          # k_v + sum of segments recomputing v >= 1
        if v in index:
            add([(n + index[v], 1.0)] + [(si, 1.0) for si in sis], 1.0, np.inf)
    for si, s in enumerate(segs):
        for v in s.liveins:                 # k_v >= r_s
            if v in index:
                add([(n + index[v], 1.0), (si, -1.0)], 0.0, np.inf)
        add([(n + m, 1.0), (si, -float(s.out_bytes))], 0.0, np.inf)  # M >= bytes_s r_s
    per_piece: dict = {}
    for si, s in enumerate(segs):
        for p in range(*s.pieces):
            per_piece.setdefault(p, []).append(si)
    for p, sis in per_piece.items():       # chosen segments do not overlap
        if len(sis) > 1:
            add([(si, 1.0) for si in sis], -np.inf, 1.0)
    add([(n + j, float(plan.nbytes[v])) for j, v in enumerate(values)] + [(n + m, 1.0)],
        -np.inf, float(target - sum(plan.nbytes[v] for v in pinned)))
    A = coo_matrix((vals, (ri, ci)), shape=(row, nv)).tocsr()
    integrality = np.zeros(nv)
    integrality[:n] = 1
    ub = np.ones(nv)
    ub[n + m] = np.inf
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nv), ub), options={"time_limit": time_limit})
    if res.x is None:
        sol = solution(plan, "milp", [False] * n, t0, target, res.message)
        sol.feasible = False
        return sol
    return solution(plan, "milp", res.x[:n] > 0.5, t0, target, res.message)


__all__ = ["solve_milp"]
