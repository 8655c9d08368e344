"""Micro-batches inside the post-AD remat pass: when to try them and how many.

:mod:`.batch` rewrites a step into loops over micro-batches; :class:`MicroBatching` is
how the strategy ladder (:mod:`.ladder`) uses it: first, where it recomputes nothing and
no scan would run K times over; over the scan rewrite's levels, when asked; below the
floor of choosing what to keep.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from graphopt import analysis, ir
from graphopt.interpreter import Stats
from graphopt.passes import PassResult

from . import batch, scan
from .budget import finish, infeasible, within


@dataclasses.dataclass(kw_only=True)
class MicroBatching:
    """Micro-batch streaming (:mod:`.batch`) as the pass uses it: first, when it
    recomputes nothing (every reduction over the batch in one loop: gradient
    accumulation) and no ``scan`` would run its iterations K times over (an RNN's steps
    on CPU: 1.5-2x slower), or when ``remat_micro_batches`` asks for it; otherwise below
    the floor of choosing what to keep. The fewest micro-batches that meet the budget win."""

    original: ir.ClosedJaxpr      # the program as given (streamed, never a rewritten one)
    wrap: Callable                # inner program -> the whole program
    measure: Callable             # program -> bytes
    budget_bytes: int
    base: int                     # the un-rematerialized program's bytes
    stats: Stats
    option: object                # remat_micro_batches: "auto", True, False or a count
    positions: list | None = None  # per flat input, its argument place
    names: list | None = None     # per argument place, its name (when the caller knows them)
    an: batch.Analysis | None = dataclasses.field(default=None, init=False)
    flops: float = dataclasses.field(default=0.0, init=False)
    tried: dict = dataclasses.field(default_factory=dict, init=False)
    why: str = dataclasses.field(default="", init=False)  # why micro-batching is impossible

    def __post_init__(self):
        if self.option is not False:
            try:
                self.an = batch.analyse(self.original, self.positions)
                self.flops = self.an.recomputed_flops()
            except batch.Unstreamable as ex:
                self.why = f"; micro-batching not possible: {ex}"
                self.stats.note("remat:" + self.why[1:])
        if self.an is not None and not self.search and self.an.n % self.option:
            raise ValueError(f"remat: remat_micro_batches={self.option} does not divide the "
                             f"batch of {self.an.n}")

    @property
    def search(self) -> bool:
        """Whether to search the count (else: ``option`` micro-batches)."""
        return self.option is True or self.option == "auto"

    def _attempt(self, why: str) -> PassResult | None:
        an = self.an
        counts = batch.micro_batch_counts(an.n) if self.search else [self.option]
        for k in counts:
            if k not in self.tried:
                prog = self.wrap(batch.stream(self.original, k, an))
                self.tried[k] = (self.measure(prog), prog)
            m, prog = self.tried[k]
            if within(m, self.budget_bytes):
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
        return batch.batch_source(self.positions, an.batched_in, self.names)

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
        for keep in scan.KEEP_ORDER:
            splan = scan.plan_scans(inner, keep)
            if len(splan.levels) <= 1:
                continue
            k_all, _, fl = splan.levels[-1]
            if fl >= flops_keep:
                continue
            scanned = scan.apply_scans(inner, splan, k_all)
            try:
                an = batch.analyse(scanned, self.positions)
            except batch.Unstreamable:
                continue
            for k in batch.micro_batch_counts(an.n):
                prog = self.wrap(batch.stream(scanned, k, an))
                m = self.measure(prog)
                if within(m, self.budget_bytes):
                    scan.apply_scans(inner, splan, k_all, self.stats)
                    self.stats.note(f"remat: scan rewrite ({scan.level_desc(splan, k_all)}) "
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
