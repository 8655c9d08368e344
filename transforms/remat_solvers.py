"""Solvers choosing which forward segments to rematerialize under a byte target.

Both minimize recomputed FLOPs subject to :meth:`Plan.model_bytes` <= target:

- :func:`solve_milp`: exact integer program in the style of Checkmate (scipy's
  ``milp`` / HiGHS, with a time limit). Binary r_s per segment (recompute it), k_v in
  [0, 1] per value (it persists: a residual of a kept segment or a live-in of a
  recomputed one), M >= the largest recomputed segment's residual bytes.
- :func:`solve_greedy`: the fast heuristic: a knapsack by bytes saved per FLOP
  recomputed, with exact byte accounting after each choice, then a clean-up pass that
  un-recomputes segments the target no longer needs (most FLOPs first).

Each returns a :class:`Solution` (what ran, seconds, the choice, model bytes, FLOPs).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .remat_plan import Plan


@dataclasses.dataclass
class Solution:
    solver: str
    remat: list          # bool per segment
    model_bytes: int
    flops: float
    seconds: float
    feasible: bool
    status: str = ""


def _finish(plan: Plan, name: str, remat, t0, target, status="") -> Solution:
    remat = [bool(r) for r in remat]
    mb = plan.model_bytes(remat)
    return Solution(name, remat, mb, plan.flops(remat), time.perf_counter() - t0,
                    mb <= target, status)


class _State:
    """Persistent-byte bookkeeping with reference counts (a value persists while any
    reason holds: pinned, residual of a kept segment, live-in of a recomputed one)."""

    def __init__(self, plan: Plan):
        self.nb = plan.nbytes
        self.refs: dict = {}
        self.total = 0
        for v in plan.pinned:
            self._inc(v, 1)
        seen = set()   # nothing recomputed yet: every residual persists (once)
        for s in plan.segments:
            for v in s.outputs:
                if v not in seen:
                    seen.add(v)
                    self._inc(v, 1)

    def _inc(self, v, d):
        old = self.refs.get(v, 0)
        new = old + d
        self.refs[v] = new
        if old <= 0 < new:
            self.total += self.nb[v]
        elif new <= 0 < old:
            self.total -= self.nb[v]

    def switch(self, s, on: bool):
        d = 1 if on else -1
        for v in s.outputs:
            self._inc(v, -d)
        for v in s.liveins:
            self._inc(v, d)


def _greedy_capped(plan: Plan, target: int, cap: int) -> list:
    """Greedy over segments whose residuals (transient bytes) are at most ``cap``."""
    segs = plan.segments
    n = len(segs)
    remat = [False] * n
    st = _State(plan)
    owner = [None] * plan.n_pieces   # which chosen segment covers each piece
    allowed = [s.out_bytes <= cap for s in segs]
    chosen_t = 0
    while st.total + chosen_t > target:
        best, best_score, best_rm = None, 0.0, ()
        cur = st.total
        for i, s in enumerate(segs):
            if remat[i] or not allowed[i]:
                continue
            inside = {owner[p] for p in range(*s.pieces) if owner[p] is not None}
            if any(not (s.pieces[0] <= segs[j].pieces[0] and segs[j].pieces[1] <= s.pieces[1])
                   for j in inside):
                continue
            for j in inside:
                st.switch(segs[j], False)
            st.switch(s, True)
            gain = cur - st.total
            st.switch(s, False)
            for j in inside:
                st.switch(segs[j], True)
            if gain <= 0:
                continue
            dflops = s.flops - sum(segs[j].flops for j in inside)
            score = gain / max(dflops + 1.0, 1.0)
            if score > best_score:
                best, best_score, best_rm = i, score, tuple(inside)
        if best is None:
            break
        for j in best_rm:
            st.switch(segs[j], False)
            remat[j] = False
        st.switch(segs[best], True)
        remat[best] = True
        for p in range(*segs[best].pieces):
            owner[p] = best
        chosen_t = max(segs[i].out_bytes for i in range(n) if remat[i])
    for i in sorted(range(n), key=lambda i: -segs[i].flops):  # give back what is not needed
        if remat[i]:
            remat[i] = False
            if plan.model_bytes(remat) > target:
                remat[i] = True
    return remat


def solve_greedy(plan: Plan, target: int, n_caps: int | None = None) -> Solution:
    """Knapsack by persistent bytes saved per recomputed FLOP (a longer segment may
    replace the shorter ones it contains), once per cap on the recomputed segments'
    transient bytes; the cheapest plan that meets ``target``, else the smallest."""
    t0 = time.perf_counter()
    if n_caps is None:  # fewer caps on big plans keep 10k-equation programs under a second
        n_caps = 8 if len(plan.segments) <= 256 else 3
    sizes = sorted({s.out_bytes for s in plan.segments})
    if len(sizes) > n_caps:
        sizes = [sizes[int(round(q))] for q in np.linspace(0, len(sizes) - 1, n_caps)]
    best = None
    for cap in sizes:
        remat = _greedy_capped(plan, target, cap)
        key = (plan.model_bytes(remat) > target, plan.flops(remat) if
               plan.model_bytes(remat) <= target else plan.model_bytes(remat))
        if best is None or key < best[0]:
            best = (key, remat)
    return _finish(plan, "greedy", best[1] if best else [], t0, target)


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
        sol = _finish(plan, "milp", [False] * n, t0, target, res.message)
        sol.feasible = False
        return sol
    return _finish(plan, "milp", res.x[:n] > 0.5, t0, target, res.message)


def solve(plan: Plan, target: int, solver: str = "auto", time_limit: float = 10.0,
          milp_max_segments: int = 400) -> Solution:
    """'milp', 'greedy', or 'auto' (milp up to ``milp_max_segments``, else greedy)."""
    if solver not in ("auto", "milp", "greedy"):
        raise ValueError(f"remat: unknown solver {solver!r}; use 'auto', 'milp' or 'greedy'")
    if solver == "greedy" or (solver == "auto" and len(plan.segments) > milp_max_segments):
        return solve_greedy(plan, target)
    sol = solve_milp(plan, target, time_limit)
    if not sol.feasible:  # the smallest plan the heuristic finds, for the caller to measure
        g = solve_greedy(plan, target)
        g.solver = "greedy (milp: " + sol.status.split(".")[0] + ")"
        return g
    if solver == "auto":  # the heuristic can only help where milp hit its time limit
        g = solve_greedy(plan, target)
        if g.feasible and (not sol.feasible or g.flops < sol.flops):
            g.solver = "greedy (milp: " + sol.status + ")"
            return g
    return sol


__all__ = ["Solution", "solve", "solve_milp", "solve_greedy"]
