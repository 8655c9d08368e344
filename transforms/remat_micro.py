"""Micro-batches inside the post-AD remat pass: when to try them and how many.

:mod:`.remat_batch` rewrites a step into loops over micro-batches; this decides where
the pass (:func:`.remat.remat_pass`) uses that: first, where it recomputes nothing and no
scan would run K times over; over the scan rewrite's levels, when asked; below the
floor of choosing what to keep.
"""
from __future__ import annotations

from graphopt import analysis
from graphopt.passes import PassResult

from . import remat_batch, remat_scan
from .remat_budget import finish, infeasible


class MicroBatching:
    """Micro-batch streaming (:mod:`.remat_batch`) as the pass uses it: first, when it
    recomputes nothing (every reduction over the batch in one loop: gradient
    accumulation) and no ``scan`` would run its iterations K times over (an RNN's steps
    on CPU: 1.5-2x slower), or when ``remat_micro_batches`` asks for it; otherwise below
    the floor of choosing what to keep. The fewest micro-batches that meet the budget win."""

    def __init__(self, original, wrap, measure, budget_bytes, base, stats, option, positions,
                 names=None):
        self.original, self.wrap, self.measure = original, wrap, measure
        self.budget_bytes, self.base, self.stats, self.option = budget_bytes, base, stats, option
        self.an, self.tried, self.why, self.positions = None, {}, "", positions
        self.names = names  # per argument place, its name (when the caller knows them)
        if option is not False:
            try:
                self.an = remat_batch.analyse(original, positions)
                self.flops = self.an.recomputed_flops()
            except remat_batch.Unstreamable as ex:
                self.why = f"; micro-batching not possible: {ex}"
                stats.note("remat:" + self.why[1:])
        self.search = option is True or option == "auto"  # else: that many
        if self.an is not None and not self.search and self.an.n % option:
            raise ValueError(f"remat: remat_micro_batches={option} does not divide the batch "
                             f"of {self.an.n}")

    def _attempt(self, why: str) -> PassResult | None:
        an = self.an
        counts = remat_batch.micro_batch_counts(an.n) if self.search else [self.option]
        for k in counts:
            if k not in self.tried:
                prog = self.wrap(remat_batch.stream(self.original, k, an))
                self.tried[k] = (self.measure(prog), prog)
            m, prog = self.tried[k]
            if m <= self.budget_bytes * 1.05:
                flops = self.flops
                self.stats.note(f"remat: {why}; the batch of {an.n} ({self._source(an)}) "
                                f"runs as {k} micro-batches "
                                f"in {an.n_loops} loop(s), one per level of reductions over the "
                                f"batch, recomputing {analysis.fmt_flops(flops)} (measured "
                                + self._measured() + ")" + self._stashed())
                self.stats.hit("remat.micro_batches", k)
                return finish(prog, self.stats, f"micro-batches ({k} x {an.n // k})",
                              self.base, m, self.budget_bytes, flops)
        return None

    def _source(self, an) -> str:  # which argument was taken as the batch
        return remat_batch.batch_source(self.positions, an.batched_in, self.names)

    def _stashed(self) -> str:
        n = len(self.an.stash)
        return (f"; {n} batched value(s) compared with a max/min over the batch kept from "
                "the loop that made them, not recomputed" if n else "")

    def _measured(self) -> str:
        return ", ".join(f"{k}: {analysis.fmt_bytes(m)}" for k, (m, _) in self.tried.items())

    def first(self) -> PassResult | None:
        if self.an is None or (self.option == "auto" and (
                self.flops > 0 or self.an.batched_scans)):
            return None
        return self._attempt("micro-batches recompute nothing here (gradient accumulation)"
                             if self.flops == 0 else "micro-batches asked for")

    def over_scans(self, inner, flops_keep: float) -> PassResult | None:
        """Micro-batches over the scan rewrite's deepest level of a keep mode, where that
        level recomputes fewer FLOPs than the choice without micro-batches (``flops_keep``):
        scanned GPT at in-body ``nothing_saveable``'s 6.3 MiB, dots kept + 4 micro-batches
        2.8 MiB instead of every layer recomputed. Only with ``remat_micro_batches=True``:
        the layer scans then run K times over (the RNN at 25%: 1.7x the CPU step time of
        the scan rewrite alone), which ``"auto"`` does not trade for FLOPs."""
        if self.an is None or self.option is not True or not self.an.batched_scans:
            return None
        for keep in remat_scan.KEEP_ORDER:
            splan = remat_scan.plan_scans(inner, keep)
            if len(splan.levels) <= 1:
                continue
            k_all, _, fl = splan.levels[-1]
            if fl >= flops_keep:
                continue
            scanned = remat_scan.apply_scans(inner, splan, k_all)
            try:
                an = remat_batch.analyse(scanned, self.positions)
            except remat_batch.Unstreamable:
                continue
            for k in remat_batch.micro_batch_counts(an.n):
                prog = self.wrap(remat_batch.stream(scanned, k, an))
                m = self.measure(prog)
                if m <= self.budget_bytes * 1.05:
                    remat_scan.apply_scans(inner, splan, k_all, self.stats)
                    self.stats.note(f"remat: scan rewrite ({remat_scan.level_desc(splan, k_all)}) "
                                    f"run as {k} micro-batches of the batch of {an.n} "
                                    f"({self._source(an)}): {analysis.fmt_flops(fl)} "
                                    f"recomputed against {analysis.fmt_flops(flops_keep)} "
                                    "without micro-batches")
                    self.stats.hit("remat.micro_batches", k)
                    return finish(prog, self.stats,
                                  f"scan rewrite + micro-batches ({k} x {an.n // k})",
                                  self.base, m, self.budget_bytes, fl)
        return None

    def below_floor(self, floor: int) -> PassResult:
        if self.an is not None:
            done = self._attempt(f"no choice of what to keep reaches the budget (least "
                                 f"{analysis.fmt_bytes(floor)})")
            if done is not None:
                return done
            self.stats.note("remat: micro-batches measured " + self._measured())
            floor = min([floor] + [m for m, _ in self.tried.values()])
        raise infeasible(self.budget_bytes, floor, self.base, self.why)
