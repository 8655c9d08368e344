"""Rematerialization under a memory budget in bytes (pass ``remat``, ``graphopt.remat``).

What it rewrites:

- **post-AD** (a whole training step: forward, backward and update in one jaxpr): a
  schedule rewrite. What it tries, in order, is one list: :data:`.ladder.STRATEGY`
  (micro-batches first -> scan levels -> segments -> refine -> micro-batches below the
  floor). Layers under ``lax.scan`` (:mod:`.scan`, :mod:`.scan_chunks`): the forward
  scan stops emitting stacked residuals and the backward scan body recomputes them per
  iteration. Segments: the forward is cut into segments (:mod:`.plan`); for each segment
  the solver (:mod:`.solvers`) picks, the values the backward reads are recomputed from
  the segment's live-ins right before their first backward use, fenced (:mod:`.rewrite`,
  :mod:`.fence`), so the forward copies die early. Micro-batches (:mod:`.micro`,
  :mod:`.batch`, :mod:`.batch_rules`): the step run as loops over micro-batches.
- **pre-AD** (a model or loss that ``jax.grad`` will differentiate, via
  ``graphopt.remat`` or ``optimize(loss, memory_budget=...)``, :mod:`.pre_ad`): each
  chosen segment becomes a ``jax.custom_vjp`` function whose forward saves only its
  inputs and whose backward recomputes the segment and its VJP; scan bodies go under
  ``jax.checkpoint`` with a keep policy (:mod:`.policies`, the one table of them).

Budget (option ``memory_budget``, :mod:`.budget`): int bytes, a string like
``"2GiB"``/``"300MB"``, or a float in (0, 1] = that fraction of the un-rematerialized
program's XLA temp memory (``temp_size_in_bytes``). The plan's byte model is calibrated
against XLA's figure by compiling candidates (a few compiles per program). A budget at
or above the un-rematerialized need is a no-op (noted); a budget below the smallest
reachable one raises :class:`BudgetError` (a ``ValueError``) stating that smallest
feasible budget in bytes.

Must not: recompute random, effectful, unknown primitives, ``while`` loops or
``custom_vjp`` calls (their values stay saved); it never reorders effects (only pure
equations are duplicated, inside the fence).
"""
from graphopt.interpreter import Stats
from graphopt.passes import Pass, register_pass

from .budget import (TOLERANCE, BudgetError, choose, estimated_temp, next_target, parse_budget,
                     xla_temp)
from .fence import fenced
from .ladder import STRATEGY
from .pass_ import remat_pass
from .pre_ad import apply_pre_ad
from .rewrite import apply_post_ad

register_pass(Pass("remat", remat_pass,
                   "rematerialize under memory_budget: recompute forward segments before "
                   "their backward uses (post-AD) or steer AD with fenced custom_vjp "
                   "segments (graphopt.remat, pre-AD)", "remat"))

__all__ = ["remat_pass", "apply_post_ad", "apply_pre_ad", "parse_budget", "fenced", "choose",
           "xla_temp", "estimated_temp", "next_target", "BudgetError", "Stats", "STRATEGY",
           "TOLERANCE"]
