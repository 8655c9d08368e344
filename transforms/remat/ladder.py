"""The post-AD remat pass's strategy ladder: what it tries, in order, in one place.

:data:`STRATEGY` is the ladder. The pass (:mod:`.pass_`) walks it with one
:class:`Search`; each step takes that search and returns the pass's result (done) or
``None`` (go on), leaving what it learned (a scan rewrite, the segment plan, the least
memory measured) in the search for the steps after it:

1. **micro-batches first**: where streaming the batch recomputes nothing (gradient
   accumulation) and no scan would run K times over, or where the user asks for it.
2. **scan levels**: layers under ``lax.scan`` drop their stacked residuals, keep modes
   from least recomputation (:data:`.policies.POLICIES`); the cheapest level meeting the
   budget wins (micro-batches over a deeper level first, when asked). Else the segments
   continue from the level measuring least.
3. **segments**: the forward cut into segments, the least-memory plan measured per
   rewrite variant; if it meets the budget, the solver's choice calibrated to XLA's figure.
4. **refine**: else drop chosen segments one at a time while XLA's figure falls.
5. **micro-batches below the floor**: else micro-batches, or a
   :class:`~graphopt.errors.BudgetError` stating the smallest feasible budget.

A measured figure meets the budget up to :data:`.budget.TOLERANCE` over it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from graphopt import analysis, ir
from graphopt.interpreter import Stats
from graphopt.passes import PassContext, PassResult

from . import scan
from .budget import choose, finish, within
from .micro import MicroBatching
from .plan import Plan, backward_start, build_plan, recomputed_segments
from .rewrite import apply_post_ad, recomputed_flops
from .solvers import solve_greedy

# The options choosing the rewrite variants a least-memory plan is measured in.
VARIANT_OPTIONS = ("remat_order_backward", "remat_narrow_fence", "remat_skip_kept")


@dataclasses.dataclass(kw_only=True)
class Search:
    """What the ladder's steps share: the program, its budget, and what earlier steps left."""

    cj: ir.ClosedJaxpr            # the program as given (a no-op returns it)
    inner: ir.ClosedJaxpr         # the level holding the backward (the scan step rewrites it)
    wrap: Callable                # inner program -> the whole program
    ctx: PassContext
    measure: Callable             # program -> bytes
    base: int                     # the un-rematerialized program's bytes
    budget_bytes: int
    stats: Stats
    micro: MicroBatching
    seg_base: int = 0             # bytes the segments start from (after a scan rewrite)
    scan_flops: float = 0.0       # FLOPs the scan rewrite recomputes
    floor: int = 0                # least bytes measured so far (micro-batches start there)
    plan: Plan | None = None
    least: list | None = None     # the least-memory plan's choice, once measured
    variant: tuple = ()           # (order_backward, narrow_fence, skip_kept) chosen

    def __post_init__(self):
        self.seg_base = self.floor = self.base

    def build(self, remat, variant=None) -> ir.ClosedJaxpr:
        """The whole program with segments ``remat`` recomputed, in rewrite ``variant``."""
        ob, nf, sk = self.variant if variant is None else variant
        return self.wrap(apply_post_ad(self.inner, self.plan, remat, Stats(), order_backward=ob,
                                       narrow=nf is not False, skip_kept=sk is not False))

    def done(self, remat, how: str, mem: int) -> PassResult:
        """The result: segments ``remat`` recomputed (notes and hits into the stats)."""
        ob, nf, sk = self.variant
        prog = self.wrap(apply_post_ad(self.inner, self.plan, remat, self.stats,
                                       order_backward=ob, narrow=nf, skip_kept=sk))
        flops = recomputed_flops(self.inner, self.plan, remat, sk) + self.scan_flops
        return finish(prog, self.stats, how, self.base, mem, self.budget_bytes, flops)


# ------------------------------------------------------------------------- the steps

def micro_first(s: Search) -> PassResult | None:
    """Micro-batches where they recompute nothing, or where asked for."""
    return s.micro.first()


def scan_levels(s: Search) -> PassResult | None:
    """Scans first: their stacked residuals are most of the memory and cheap to recompute
    per iteration. Like jax.checkpoint's policies, least recomputation first: from kept
    dot outputs (all, then those without batch dims), then from the carries alone."""
    seen, least = set(), None  # least: (bytes, plan, level) of the deepest level measuring least
    for keep in (scan.KEEP_ORDER if s.ctx.option("remat_scan", True) else ()):
        splan = scan.plan_scans(s.inner, keep)
        sig = (tuple(splan.order), tuple(splan.levels))
        if len(splan.levels) <= 1 or sig in seen:  # nothing to drop, or as before
            continue
        seen.add(sig)
        k_all = splan.levels[-1][0]
        m_all = s.measure(s.wrap(scan.apply_scans(s.inner, splan, k_all)))
        s.stats.note(f"remat: {len(splan.pairs)} forward/backward scan pair(s), "
                     f"{len(splan.order)} stacked residuals to drop "
                     f"({analysis.fmt_bytes(splan.residual_bytes)}); deepest level "
                     f"({scan.level_desc(splan, k_all)}): {analysis.fmt_bytes(m_all)}")
        if within(m_all, s.budget_bytes):
            return _scan_level(s, splan, m_all)
        if k_all != splan.base_k:  # chunking is chosen by the byte model: check XLA agrees
            m_base = s.measure(s.wrap(scan.apply_scans(s.inner, splan, splan.base_k)))
            if m_base <= m_all:
                s.stats.note(f"remat: chunked carries measure {analysis.fmt_bytes(m_all)}, no "
                             f"better than without ({analysis.fmt_bytes(m_base)}): not chunked")
                k_all, m_all = splan.base_k, m_base
        if least is None or m_all < least[0]:
            least = (m_all, splan, k_all)
    if least is not None and least[0] < s.base:  # no mode meets the budget: segments
        m_all, splan, k_all = least                   # continue from the least measured
        s.inner = scan.apply_scans(s.inner, splan, k_all, s.stats)
        s.seg_base = s.floor = m_all
        s.scan_flops = next(fl for k, _, fl in splan.levels if k == k_all)
    return None


def _scan_level(s: Search, splan, m_all: int) -> PassResult:
    """The cheapest level of ``splan`` meeting the budget (its deepest, ``m_all``, does),
    or micro-batches over a deeper level where they recompute less (when asked)."""
    def build(k):
        return s.wrap(scan.apply_scans(s.inner, splan, k))
    idx, prog, mem = scan.choose_level(splan, build, s.measure, s.base, m_all,
                                       s.budget_bytes, stats=s.stats)
    k, _, fl = splan.levels[idx]
    over = s.micro.over_scans(s.inner, fl)
    if over is not None:
        return over
    scan.apply_scans(s.inner, splan, k, s.stats)  # the notes and hits of the choice
    return finish(prog, s.stats, f"solver scan-greedy ({scan.level_desc(splan, k)})",
                  s.base, mem, s.budget_bytes, fl)


def segments(s: Search) -> PassResult | None:
    """Segments of the forward: the least-memory plan measured per rewrite variant
    (fixing the variant and the floor); where it meets the budget, the solver's choice."""
    s.plan = build_plan(s.inner, backward_start(s.inner.jaxpr),
                        max_cuts=s.ctx.option("remat_max_cuts", 128))
    if not s.plan.segments:
        if s.seg_base >= s.base:  # the scan rewrite, if any, is all there is
            s.stats.note("remat: no recomputable forward values reach the backward; "
                         "nothing to drop")
        return None
    _measure_least(s)
    if not within(s.floor, s.budget_bytes):
        return None
    prog, sol, mem = choose(s.plan, s.build, s.measure, s.budget_bytes, s.seg_base,
                            solver=s.ctx.option("remat_solver", "auto"),
                            time_limit=s.ctx.option("remat_time_limit", 10.0), stats=s.stats,
                            known={tuple(s.least): s.floor},
                            anchor=(s.plan.model_bytes(s.least), s.floor))
    if not any(sol.remat) and s.seg_base == s.base:
        return PassResult(s.cj, False, s.stats)
    return s.done(sol.remat, f"solver {sol.solver} ({sol.seconds * 1e3:.1f} ms)", mem)


def _measure_least(s: Search) -> None:
    """The least-memory plan, measured once per rewrite variant: it fixes the variant XLA
    keeps best ("auto") and the smallest feasible budget, so infeasible budgets fail fast.
    Each variant helps some models and costs on others (deep MLP: 8.5 MiB with kept
    values skipped, no ordering, whole segments; GPT: 7.5 MiB with ordering, fused
    tail, kept values recomputed), through XLA's scheduling and layout copies."""
    asked = []
    for name in VARIANT_OPTIONS:
        v = s.ctx.option(name, "auto")
        if v not in ("auto", True, False):
            raise ValueError(f"remat: {name} must be 'auto', True or False, got {v!r}")
        asked.append(v)
    least = solve_greedy(s.plan, 0)
    s.least = least.remat
    n_out = sum(len(g.outputs) for g, r in zip(s.plan.segments, least.remat) if r)
    if asked[2] == "auto" and sum(len(g.outputs) for g in recomputed_segments(
            s.inner.jaxpr, s.plan, least.remat)) == n_out:
        asked[2] = True  # nothing to skip: both ways are the same program
    ways = [(True, False) if v == "auto" else (v,) for v in asked]
    floors = {k: s.measure(s.build(least.remat, k))
              for k in ((ob, nf, sk) for ob in ways[0] for nf in ways[1] for sk in ways[2])}
    s.variant = min(floors, key=lambda k: (floors[k], *(not x for x in k)))
    s.floor = floors[s.variant]
    s.stats.note("remat: least-memory plan measures (backward ordered at fences / fusible "
                 "tail outside the fence / kept values not recomputed) " + ", ".join(
                     "/".join("on" if x else "off" for x in k) + f" {analysis.fmt_bytes(m)}"
                     for k, m in floors.items()) + f"; kept {analysis.fmt_bytes(s.floor)}")


def refine(s: Search) -> PassResult | None:
    """The byte model ignores XLA's fusion: a chosen segment can cost more than it saves
    (CNN: 18 MiB with all three, 16 MiB without the stage-1 ones). Drop chosen segments
    one at a time while the measured figure falls."""
    if s.least is None or within(s.floor, s.budget_bytes):
        return None  # no segments, or the segments step met the budget already
    cur, chosen = list(s.least), [i for i, r in enumerate(s.least) if r]
    floor = s.floor
    if 1 < len(chosen) <= s.ctx.option("remat_refine_max", 20):
        for i in reversed(chosen):
            trial = list(cur)
            trial[i] = False
            m = s.measure(s.build(trial))
            if m < floor:
                cur, floor = trial, m
        s.stats.note(f"remat: least-memory plan refined by dropping segments: "
                     f"{sum(cur)}/{len(chosen)} kept, {analysis.fmt_bytes(floor)}")
    if not within(floor, s.budget_bytes):
        s.floor = min(floor, s.seg_base)
        return None
    return s.done(cur, "solver greedy+measured refinement", floor)


def micro_below_floor(s: Search) -> PassResult:
    """Micro-batches under the least memory found, else the BudgetError stating it."""
    return s.micro.below_floor(s.floor)


class Step(NamedTuple):
    name: str
    run: Callable[[Search], PassResult | None]


# The ladder, in the order the pass tries it.
STRATEGY: tuple[Step, ...] = (
    Step("micro-batches first", micro_first),
    Step("scan levels", scan_levels),
    Step("segments", segments),
    Step("refine", refine),
    Step("micro-batches below the floor", micro_below_floor),
)


def walk(s: Search, steps=STRATEGY) -> PassResult:
    """The first result a step of ``steps`` returns (the last one always ends it)."""
    for step in steps:
        res = step.run(s)
        if res is not None:
            return res
    raise AssertionError("remat: the strategy ladder ended without a result")


__all__ = ["Search", "Step", "STRATEGY", "walk", "micro_first", "scan_levels", "segments",
           "refine", "micro_below_floor", "VARIANT_OPTIONS"]
