"""The remat pass itself (:func:`remat_pass`): where it applies, its options checked, and
the post-AD strategy ladder (:mod:`.ladder`) walked; pre-AD programs go to :mod:`.pre_ad`.
"""
from __future__ import annotations

import dataclasses

import jax

from graphopt import analysis, ir
from graphopt.errors import OptionError
from graphopt.interpreter import Stats
from graphopt.passes import PassContext, PassResult

from . import ladder, scan
from .budget import MEASURES, BudgetError, devices_of, parse_budget, per_device
from .micro import MicroBatching
from .plan import backward_start
from .pre_ad import PRE_AD_SCOPE, pre_ad_pass


def _target_level(cj: ir.ClosedJaxpr):
    """(closed jaxpr holding the backward, wrap(new inner) -> new program, per inner
    invar the index of the program's invar it is or None) or None."""
    if backward_start(cj.jaxpr) is not None:
        return cj, lambda new: new, list(range(len(cj.jaxpr.invars)))
    pos = {v: i for i, v in enumerate(cj.jaxpr.invars)}
    for idx, e in enumerate(cj.jaxpr.eqns):  # a step under one jit: rewrite its body
        if e.primitive.name in ("jit", "pjit", "closed_call"):
            for key, _, sub in ir.subjaxpr_params(e):
                inner = ir.as_closed(sub)
                found = _target_level(inner)
                if found is None:
                    continue
                inner_cj, wrap_inner, imap = found
                outer = [pos.get(a) if ir.is_var(a) else None for a in e.invars]

                def wrap(new, idx=idx, key=key, wrap_inner=wrap_inner, e=e, sub=sub):
                    body = wrap_inner(new)
                    if ir.is_open_subjaxpr(e, key, sub):
                        body = body.jaxpr
                    ne = e.replace(params={**e.params, key: body})
                    eqs = list(cj.jaxpr.eqns)
                    eqs[idx] = ne
                    return ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=eqs), cj.consts)
                return inner_cj, wrap, [None if k is None else outer[k] for k in imap]
    return None


def _rematerialized(jaxpr) -> bool:
    """Whether graphopt's recomputations or micro-batch loops are in this program already
    (at its top level, in a scan body, or under one jit)."""
    if (any(ir.name_stack(e).split("/")[0] in ("remat", PRE_AD_SCOPE) for e in jaxpr.eqns)
            or scan.scan_rematerialized(jaxpr)):
        return True
    return any(_rematerialized(ir.as_closed(sub).jaxpr) for e in jaxpr.eqns
               if e.primitive.name in ("jit", "pjit", "closed_call", "custom_jvp_call")
               for _, _, sub in ir.subjaxpr_params(e))


def _n_custom_jvps(cj) -> int:
    return sum(e.primitive.name == "custom_jvp_call" for e, _, _ in ir.walk_eqns(cj))


def keep_derivatives(cj: ir.ClosedJaxpr, res: PassResult) -> PassResult:
    """``res`` differentiating as ``cj`` does. Micro-batching inlines the step's
    ``custom_jvp`` calls (relu, log_softmax, a user's) to stream their bodies, which leaves
    the step's values and its own gradients as they were but would give a derivative taken
    *of the optimized step* the bodies' derivatives instead of the custom rules. So the
    result becomes one ``custom_jvp``: the rewritten program forward, the original's JVP
    as its rule (it costs nothing unless the step itself is differentiated)."""
    if not res.changed or _n_custom_jvps(res.jaxpr) >= _n_custom_jvps(cj):
        return res
    if any(ir.effectful(e) for e, _, _ in ir.walk_eqns(cj)):  # custom_jvp takes no effects
        res.stats.note("remat: micro-batches opened custom_jvp calls and the step has effects: "
                       "a derivative taken of the optimized step uses their bodies' own "
                       "derivatives, not their custom rules")
        return res
    original, rewritten = ir.jaxpr_as_fun(cj), ir.jaxpr_as_fun(res.jaxpr)
    step = jax.custom_jvp(lambda *a: list(rewritten(*a)))
    step.defjvp(lambda p, t: jax.jvp(lambda *a: list(original(*a)), p, t))
    res.stats.note("remat: micro-batches opened custom_jvp calls; the optimized step keeps "
                   "the original's derivative as one custom_jvp rule")
    return PassResult(ir.trace_flat(step, cj.in_avals), True, res.stats)


def remat_pass(cj: ir.ClosedJaxpr, ctx: PassContext) -> PassResult:
    """The remat pass; on inputs sharded over several devices the budget is per device
    (programs are measured as the SPMD program XLA compiles for one device)."""
    n = devices_of(ctx)
    if n == 1 or ctx.option("memory_budget") is None:
        return _remat_pass(cj, ctx)
    micro_opt = ctx.option("remat_micro_batches", "auto")
    if micro_opt is not False and micro_opt != "auto":
        raise OptionError(f"remat: remat_micro_batches={micro_opt!r} with inputs sharded over "
                          f"{n} devices: slicing a sharded batch into micro-batches would move "
                          f"it between devices; pass remat_micro_batches=False")
    # a micro-batch of a sharded batch lives on some devices only: recompute instead
    ctx = dataclasses.replace(ctx, options={**ctx.options, "remat_micro_batches": False})
    with per_device(ctx):
        try:
            res = _remat_pass(cj, ctx)
        except BudgetError as e:  # say which memory the figures are
            raise BudgetError(f"{e} (per device: inputs sharded over {n} devices)",
                              budget_bytes=e.budget_bytes, floor_bytes=e.floor_bytes,
                              base_bytes=e.base_bytes) from None
    res.stats.note(f"remat: inputs sharded over {n} devices: the budget and every figure "
                   f"are per device; no micro-batches (a sharded batch is not sliced)")
    return res


def _remat_pass(cj: ir.ClosedJaxpr, ctx: PassContext) -> PassResult:
    stats = Stats()
    budget = ctx.option("memory_budget")
    if budget is None:
        stats.note("remat: no memory_budget given; nothing to do")
        return PassResult(cj, False, stats)
    if _rematerialized(cj.jaxpr):
        # a fraction refers to the un-rematerialized program: never compound it
        stats.note("remat: program already rematerialized by graphopt; left as is")
        return PassResult(cj, False, stats)
    found = _target_level(cj)
    if found is None:  # no backward pass: steer what jax.grad will save instead
        return pre_ad_pass(cj, ctx, stats)
    inner, wrap, invar_map = found
    positions = None if ctx.arg_positions is None else [
        None if k is None else ctx.arg_positions[k] for k in invar_map]
    how = ctx.option("remat_measure", "xla")
    if how not in MEASURES:
        raise ValueError(f"remat: remat_measure must be one of {sorted(MEASURES)}, got {how!r}")
    measure = MEASURES[how]
    micro_opt = ctx.option("remat_micro_batches", "auto")
    if not (micro_opt is True or micro_opt is False or micro_opt == "auto"
            or (type(micro_opt) is int and micro_opt > 1)):  # `is`: 1 == True
        raise ValueError(f"remat: remat_micro_batches must be 'auto', True, False or a number "
                         f"of micro-batches > 1, got {micro_opt!r}")
    base = measure(cj)
    budget_bytes = parse_budget(budget, base)
    sched = "memory-aware" if analysis.memory_aware_scheduler_active() else \
        "default (set XLA_FLAGS=" + analysis.memory_aware_scheduler_flag() + " for real savings)"
    stats.note(f"remat: post-AD schedule rewrite; memory measured by {how}"
               + (f"; XLA CPU scheduler {sched}" if how == "xla" and ctx.platform == "cpu" else ""))
    if budget_bytes >= base:
        stats.note(f"remat: budget {analysis.fmt_bytes(budget_bytes)} >= the program's "
                   f"un-rematerialized temp memory {analysis.fmt_bytes(base)}: no-op")
        return PassResult(cj, False, stats)
    # micro-batches stream the program as given, not a rewritten one
    micro = MicroBatching(original=inner, wrap=wrap, measure=measure, budget_bytes=budget_bytes,
                          base=base, stats=stats, option=micro_opt, positions=positions,
                          names=getattr(ctx, "arg_names", None))
    # a scan whose body has effects or random numbers is never recomputed: say so
    impure_scans = [ir.source_line(e) or "no source line" for e in inner.jaxpr.eqns
                    if e.primitive.name == "scan" and ir.impure(e)]
    if impure_scans:
        why = (f"; scan rewrite not possible for the scan(s) at {', '.join(impure_scans)}: "
               "their bodies have effects or random numbers")
        stats.note("remat:" + why[1:])
        micro.why += why
    return keep_derivatives(cj, ladder.walk(ladder.Search(
        cj=cj, inner=inner, wrap=wrap, ctx=ctx, measure=measure, base=base,
        budget_bytes=budget_bytes, stats=stats, micro=micro)))


__all__ = ["remat_pass"]
