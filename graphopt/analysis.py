"""Cost model: FLOPs and bytes, liveness and peak memory, XLA's own figures, parallelism.

Everything here reads a jaxpr and changes nothing; it knows no particular pass.

- :func:`eqn_cost` / :func:`program_cost` / :func:`cost_by_scope` — FLOPs,
  transcendentals and bytes moved, from a per-primitive rule table (:data:`FLOP_RULES`,
  :data:`TRANSCENDENTAL_RULES`) with an explicit default. Nested sub-jaxprs count,
  weighted by how often they run (scan: ``length``; while: once, and reported; cond:
  the costliest branch).
- :func:`liveness` / :func:`peak_memory` / :func:`memory_timeline` — which values are
  live along the jaxpr's own equation order, and an *estimate* of the temporary memory
  XLA would need (XLA fuses, reorders and reuses buffers, so its figure differs; compare
  with :func:`xla_memory` / :func:`estimate_vs_xla`).
- :func:`xla_memory` / :func:`xla_cost` — what XLA itself reports for the compiled
  program (``memory_analysis()``, ``cost_analysis()``).
- :func:`critical_path` / :func:`parallelism` / :func:`independent_branches` — the
  longest FLOP-weighted chain through the top-level dataflow graph and how much work
  could run beside it.
- :func:`fmt_bytes` / :func:`fmt_flops` — human units, reused by report and viz.

The parts live in :mod:`graphopt.cost`, :mod:`graphopt.liveness` and
:mod:`graphopt.critical_path`; this module gathers their public names. Only names from
:mod:`graphopt.ir` reach jaxpr internals.
"""
from .cost import (COMBINER_PRIMITIVES, FLOP_RULES, TRANSCENDENTAL_RULES, Cost, ProgramCost,
                   cost_by_scope, default_flop_rule, default_transcendental_rule, eqn_cost,
                   fmt_bytes, fmt_flops, is_higher_order, program_cost, top_level)
from .critical_path import NODE_EPS, critical_path, independent_branches, parallelism
from .liveness import (Liveness, estimate_vs_xla, liveness, memory_aware_scheduler_active,
                       memory_aware_scheduler_flag, memory_timeline, peak_memory, xla_cost,
                       xla_memory)

__all__ = [
    "Cost", "ProgramCost", "Liveness", "FLOP_RULES", "TRANSCENDENTAL_RULES",
    "COMBINER_PRIMITIVES", "NODE_EPS", "default_flop_rule", "default_transcendental_rule",
    "is_higher_order", "top_level", "eqn_cost", "program_cost", "cost_by_scope", "liveness",
    "peak_memory", "memory_timeline", "xla_memory", "xla_cost", "estimate_vs_xla",
    "memory_aware_scheduler_flag", "memory_aware_scheduler_active", "critical_path",
    "parallelism", "independent_branches", "fmt_bytes", "fmt_flops",
]
