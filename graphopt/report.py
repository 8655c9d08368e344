"""What the pipeline did: per pass equations, rule hits, costs, time; XLA memory on demand.

A :class:`Report` prints as a text table in a terminal and renders as HTML in a
notebook (``_repr_html_``); ``write_html(dir)`` saves it. Costs are computed lazily from
the jaxprs kept in each :class:`~graphopt.passes.PassRecord`, so building a report
costs nothing until someone looks at it.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import os
from collections import Counter
from typing import Callable

from . import analysis, ir


@dataclasses.dataclass
class Report:
    name: str
    placement: str
    original: ir.ClosedJaxpr
    optimized: ir.ClosedJaxpr
    records: list
    trace_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    passes: list = dataclasses.field(default_factory=list)
    check_inputs: str | None = None
    check_errors: dict | None = None
    _fns: tuple | None = None

    def bind_functions(self, original_fn: Callable, optimized_fn: Callable, args) -> None:
        """Remember flat functions and argument shapes (ShapeDtypeStructs) for :meth:`xla_memory`."""
        self._fns = (original_fn, optimized_fn, list(args))

    # ------------------------------------------------------------------ numbers
    @property
    def eqns_before(self) -> int:
        return ir.count_eqns(self.original)

    @property
    def eqns_after(self) -> int:
        return ir.count_eqns(self.optimized)

    def cost_before(self):
        return analysis.program_cost(self.original)

    def cost_after(self):
        return analysis.program_cost(self.optimized)

    def hits(self) -> Counter:
        """Rule hits summed over every pass run."""
        total: Counter = Counter()
        for r in self.records:
            total.update(r.stats.hits)
        return total

    def unknown_primitives(self) -> Counter:
        """Equations passed through untouched because a pass did not know their primitive.

        Every pass run sees the same equations again, so the count is the largest any
        single run saw, not a sum over runs.
        """
        total: Counter = Counter()
        for r in self.records:
            for k, v in r.stats.unknown.items():
                total[k] = max(total[k], v)
        return total

    def notes(self) -> list[str]:
        out: list[str] = []
        for r in self.records:
            out.extend(n for n in r.stats.notes if n not in out)
        return out

    @functools.cached_property
    def parallelism(self):
        """:func:`graphopt.parallelism.analyze` of the original program (computed once)."""
        from .parallelism import analyze
        return analyze(self.original)

    def batching(self) -> dict:
        """What ``batch_parallel`` did over its runs: {"batched": packs batched,
        "declined": regions the cost model declined, "ran": whether it ran at all}."""
        runs = [r for r in self.records if r.name == "batch_parallel"]
        return {"ran": bool(runs),
                "batched": sum(d["packs"] for r in runs for d in r.stats.details.get("batched", [])),
                "declined": sum(len(r.stats.details.get("declined", [])) for r in runs)}

    def parallelism_line(self) -> str:
        """One line: work, critical path, available parallelism, repeated-branch groups and
        what batch_parallel did with them. Analysed here only up to
        PARALLELISM_MAX_EQNS equations (``report.parallelism`` always analyses)."""
        if "parallelism" not in self.__dict__ and self.eqns_before > PARALLELISM_MAX_EQNS:
            return (f"parallelism: not analysed for {self.eqns_before} equations "
                    "(report.parallelism computes it)")
        try:
            p = self.parallelism
        except Exception as exc:  # noqa: BLE001 - a display line must not break printing the report
            return f"parallelism: not analysed ({type(exc).__name__}: {exc})"
        line = (f"parallelism: work {analysis.fmt_flops(p.total_flops)}, critical path "
                f"{analysis.fmt_flops(p.critical_path_flops)}, available parallelism "
                f"{p.parallelism:.2f}, {len(p.repeated)} repeated-branch groups")
        b = self.batching()
        if b["batched"]:
            line += f" (batch_parallel batched {b['batched']} packs)"
        elif b["declined"]:
            line += " (batch_parallel declined: no gain expected)"
        return line

    def xla_memory(self) -> dict:
        """XLA's compiled memory figures before and after (compiles both programs)."""
        if self._fns is None:
            raise ValueError("this report has no functions bound; use graphopt.optimize(...).report(args)")
        orig, opt, args = self._fns
        return {"before": analysis.xla_memory(orig, *args), "after": analysis.xla_memory(opt, *args)}

    def rows(self) -> list[dict]:
        """One dict per pass run: name, round, eqns before/after, hits, flops, seconds."""
        out = []
        for r in self.records:
            cb = analysis.program_cost(r.before)
            ca = analysis.program_cost(r.after) if r.changed else cb
            out.append(dict(
                pass_=r.name, round=r.round, eqns_before=r.eqns_before,
                eqns_after=r.eqns_after if r.changed else r.eqns_before,
                flops_before=cb.flops, flops_after=ca.flops, bytes_before=cb.bytes, bytes_after=ca.bytes,
                hits=dict(r.stats.hits), unknown=dict(r.stats.unknown), seconds=r.seconds,
                changed=r.changed))
        return out

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        cb, ca = self.cost_before(), self.cost_after()
        lines = [
            f"graphopt report: {self.name}",
            f"  placement: {self.placement}" + (
                " (jaxpr holds forward and backward)" if self.placement == "post-AD"
                else " (jax.grad applied outside differentiates the rewritten forward)"),
            f"  passes: {', '.join(self.passes)}",
            f"  equations: {self.eqns_before} -> {self.eqns_after}   "
            f"FLOPs: {analysis.fmt_flops(cb.flops)} -> {analysis.fmt_flops(ca.flops)}   "
            f"bytes: {analysis.fmt_bytes(cb.bytes)} -> {analysis.fmt_bytes(ca.bytes)}",
            f"  trace {self.trace_seconds * 1e3:.1f} ms, pipeline {self.pipeline_seconds * 1e3:.1f} ms",
            f"  {self.parallelism_line()}",
            "",
            f"  {'pass':<12}{'round':>6}{'eqns':>16}{'FLOPs':>24}{'ms':>9}  rule hits",
        ]
        for row in self.rows():
            hits = ", ".join(f"{k}×{v}" for k, v in sorted(row["hits"].items())) or "-"
            lines.append(
                f"  {row['pass_']:<12}{row['round']:>6}"
                f"{row['eqns_before']:>8} -> {row['eqns_after']:<5}"
                f"{analysis.fmt_flops(row['flops_before']):>11} -> {analysis.fmt_flops(row['flops_after']):<10}"
                f"{row['seconds'] * 1e3:>9.2f}  {hits}")
        unk = self.unknown_primitives()
        if unk:
            lines.append("  unknown primitives passed through: "
                         + ", ".join(f"{k}×{v}" for k, v in unk.items()))
        for n in self.notes():
            lines.append(f"  note: {n}")
        if self.check_errors is not None:
            lines.append(f"  check ({self.check_inputs}): " + ", ".join(
                f"{k} max rel err {v['max_rel_err']:.2e}" for k, v in self.check_errors.items()))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cb, ca = self.cost_before(), self.cost_after()
        e = html.escape
        head = (f"<h3>graphopt report: {e(self.name)}</h3>"
                f"<p><b>placement</b>: {e(self.placement)} &nbsp; <b>equations</b>: "
                f"{self.eqns_before} → {self.eqns_after} &nbsp; <b>FLOPs</b>: "
                f"{e(analysis.fmt_flops(cb.flops))} → {e(analysis.fmt_flops(ca.flops))} &nbsp; "
                f"<b>pipeline</b>: {self.pipeline_seconds * 1e3:.1f} ms</p>"
                f"<p>{e(self.parallelism_line())}</p>")
        rows = "".join(
            f"<tr><td>{e(r['pass_'])}</td><td>{r['round']}</td><td>{r['eqns_before']} → {r['eqns_after']}</td>"
            f"<td>{e(analysis.fmt_flops(r['flops_before']))} → {e(analysis.fmt_flops(r['flops_after']))}</td>"
            f"<td>{r['seconds'] * 1e3:.2f}</td>"
            f"<td>{e(', '.join(f'{k}×{v}' for k, v in sorted(r['hits'].items())) or '-')}</td></tr>"
            for r in self.rows())
        table = ("<table><thead><tr><th>pass</th><th>round</th><th>equations</th><th>FLOPs</th>"
                 f"<th>ms</th><th>rule hits</th></tr></thead><tbody>{rows}</tbody></table>")
        extra = ""
        unk = self.unknown_primitives()
        if unk:
            extra += f"<p>unknown primitives passed through: {e(str(dict(unk)))}</p>"
        for n in self.notes():
            extra += f"<p>note: {e(n)}</p>"
        return head + table + extra

    def write_html(self, directory: str, filename: str | None = None) -> str:
        """Write the report as a standalone HTML page; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, filename or f"{self.name}.html")
        with open(path, "w") as f:
            f.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.name)}"
                    f"</title><style>{_CSS}</style></head><body>{self._repr_html_()}</body></html>")
        return path


PARALLELISM_MAX_EQNS = 5000  # str(report) analyses parallelism only up to this size

_CSS = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#eee}")

__all__ = ["Report"]
