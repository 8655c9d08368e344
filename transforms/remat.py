"""Rematerialization under a memory budget in bytes (pass ``remat``, ``graphopt.remat``).

What it rewrites:

- **post-AD** (a whole training step: forward, backward and update in one jaxpr): a
  schedule rewrite. The forward is cut into segments (:mod:`.remat_plan`); for each
  segment the solver (:mod:`.remat_solvers`) picks, the values the backward reads are
  recomputed from the segment's live-ins right before their first backward use, and the
  backward reads the recomputed copies, so the forward copies die early. Values that stay
  live anyway (another chosen segment's live-ins, e.g. a residual block's output) are
  not recomputed, so each recomputation waits for its own block's backward
  (``remat_skip_kept``; "auto" measures it like the fence variants). Layers under
  ``lax.scan`` go first (:mod:`.remat_scan`): the forward scan stops emitting stacked
  residuals and the backward scan body recomputes them per iteration.
- **post-AD micro-batches** (:mod:`.remat_batch`): the step run as loops over
  micro-batches, first where that recomputes nothing (gradient accumulation), else below
  the floor of choosing what to keep (batch norm) (``remat_micro_batches``).
- **pre-AD** (a model or loss that ``jax.grad`` will differentiate, via
  ``graphopt.remat`` or ``optimize(loss, memory_budget=...)``, :mod:`.remat_pre`): each chosen segment becomes a
  ``jax.custom_vjp`` function whose forward saves only its inputs and whose backward
  recomputes the segment and its VJP.

Fence: XLA CPU drops ``optimization_barrier`` after compilation and its CSE merges a
recomputation with the forward value it was meant to replace. Every recomputation here
runs inside a ``lax.cond`` whose two branches are the same recomputation and whose
predicate comes from a backward value (``g[0] == g[0]``): XLA cannot fold it, so the
recomputation stays, happens after the cotangent exists, and results are identical
whatever the predicate (both branches agree). Only a segment's non-fusible core runs in
the cond; its per-element tail runs after it on the cond's outputs, so XLA can still fuse
it into the backward consumers (``remat_narrow_fence``).

Budget (option ``memory_budget``): int bytes, a string like ``"2GiB"``/``"300MB"``, or
a float in (0, 1] = that fraction of the un-rematerialized program's XLA temp memory
(``temp_size_in_bytes``). The plan's byte model is calibrated against XLA's figure by
compiling candidates (a few compiles per program; :mod:`.remat_budget`). A budget at or above the
un-rematerialized need is a no-op (noted); a budget below the smallest reachable one
raises ``ValueError`` stating that smallest feasible budget in bytes.

Must not: recompute random, effectful, unknown primitives, ``while`` loops or
``custom_vjp`` calls (their values stay saved); it never reorders effects (only pure
equations are duplicated, inside the fence).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from graphopt import analysis, ir
from graphopt.errors import OptionError
from graphopt.interpreter import Stats
from graphopt.passes import Pass, PassContext, PassResult, register_pass

from . import remat_micro, remat_plan, remat_scan
from .remat_budget import (MEASURES, BudgetError, choose, devices_of, estimated_temp, finish,
                           next_target, parse_budget, per_device, xla_temp)
from .remat_plan import Plan, backward_start, build_plan, float_compare, recomputed_segments
from .remat_solvers import solve_greedy

# ------------------------------------------------------------------------- the fence

def _fence_pred(gs):
    """A predicate XLA cannot fold, true unless the cotangent is NaN."""
    s = sum(g.reshape(-1)[0].astype(jnp.float32) for g in gs)
    return s == s


def fenced(fn, gs, *xs):
    """``fn(*xs)`` inside ``lax.cond(g[0] == g[0], fn, fn, ...)``: survives XLA's CSE."""
    gs = [g for g in gs if jnp.issubdtype(g.dtype, jnp.floating) and g.size > 0]
    if not gs:  # nothing to key on: an optimization barrier is all we can do
        return fn(*lax.optimization_barrier(xs))
    return lax.cond(_fence_pred(gs), fn, fn, *xs)


def _float_var(v) -> bool:
    a = getattr(v, "aval", None)
    return (ir.is_var(v) and ir.is_array_aval(a) and jnp.issubdtype(a.dtype, jnp.floating)
            and ir.aval_nbytes(a) > 0)


# --------------------------------------------------------------------- post-AD rewrite

def _segment_fun(jaxpr, seg):
    sub = ir.make_jaxpr_from(jaxpr, constvars=[], invars=list(seg.inputs),
                             outvars=list(seg.outputs), eqns=[jaxpr.eqns[i] for i in seg.eqns],
                             effects=frozenset())
    return ir.jaxpr_as_fun(ir.closed(sub))


# Per-element primitives XLA fuses into their consumers rather than materializing.
_FUSIBLE = frozenset((
    "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "square",
    "one_minus_square",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "select_n", "sqrt", "rsqrt",
    "exp", "log", "tanh", "logistic", "integer_pow", "pow", "erf", "broadcast_in_dim",
    "reshape", "squeeze", "expand_dims", "convert_element_type", "copy", "copy_p"))


def _fusible(e) -> bool:
    subs = [s for _, _, s in ir.subjaxpr_params(e)]
    if subs and e.primitive.name in ("custom_jvp_call", "jit", "pjit", "closed_call"):
        return all(_fusible(x) for s in subs for x in ir.as_closed(s).jaxpr.eqns)
    return e.primitive.name in _FUSIBLE and not subs


def _core_tail(jaxpr, seg):
    """Split ``seg``'s equations: (core run inside the fence, fusible tail after it).

    A cond returns every output materialized at once, which defeats XLA's fusion of
    cheap elementwise residuals into their backward consumers (the CNN's BN/ReLU
    values): only the tail's inputs leave the fence; each tail equation reads at least
    one fenced value, so XLA's CSE cannot merge it with the forward copy.
    """
    eqns = [jaxpr.eqns[i] for i in seg.eqns]
    made = {v for e in eqns for v in e.outvars}
    core = [not _fusible(e) for e in eqns]
    prod = {v: k for k, e in enumerate(eqns) for v in e.outvars}
    for k in range(len(eqns) - 1, -1, -1):  # what a core equation reads is core too
        if core[k]:
            for a in eqns[k].invars:
                if ir.is_var(a) and a in prod:
                    core[prod[a]] = True
    # a tail equation reading only forward values gets its smallest input through the
    # fence (identity), else CSE would merge it with its forward copy
    via = {}
    for e, c in zip(eqns, core):
        if not c and not any(ir.is_var(a) and (a in made or a in via) for a in e.invars):
            ins = [a for a in e.invars if ir.is_var(a) and a not in made]
            if not ins:  # e.g. an iota-only broadcast: keep it inside
                continue
            v = min(ins, key=lambda a: ir.aval_nbytes(a.aval))
            via[v] = ir.new_var(v.aval)
    return ([e for e, c in zip(eqns, core) if c], [e for e, c in zip(eqns, core) if not c],
            via)


def _frontier(eqns, a: int, b: int) -> list:
    """Float outputs of ``eqns[a:b]`` that no equation in ``eqns[a:b]`` reads."""
    read = {x for e in eqns[a:b] for x in e.invars if ir.is_var(x)}
    return [v for e in eqns[a:b] if not ir.impure(e) for v in e.outvars
            if _float_var(v) and v not in read]


def _input_dependent(jaxpr) -> set:
    """Vars whose value depends on the program's inputs (not on constants alone)."""
    dep = set(jaxpr.invars)
    for e in jaxpr.eqns:
        if any(ir.is_var(a) and a in dep for a in e.invars):
            dep.update(v for v in e.outvars if ir.is_var(v))
    return dep


def _pin(m, x):
    """``m`` through a cond XLA cannot fold, keyed on the comparison operand ``x``: the
    branch taken when ``x[0]`` is not NaN ands the mask with that very fact (identical
    branches would be forwarded away by ``lax.cond``)."""
    p = _fence_pred([x])
    return lax.cond(p, lambda m, p: m & p, lambda m, p: m, m, p)


def _pinned_compares(fwd, env) -> tuple[list, list]:
    """The forward equations, each float comparison's result (a max's gradient mask)
    materialized once through a fence. Otherwise XLA fuses the comparison into each of
    its consumers, recomputing its operands there, and a rewrite that changes the fusion
    lets the copies round apart: a mask empty in one consumer, set in another."""
    out, consts = [], []
    for e in fwd:
        new_in = [env.get(a, a) if ir.is_var(a) else a for a in e.invars]
        out.append(e.replace(invars=new_in) if new_in != list(e.invars) else e)
        x = next((a for a in new_in if _float_var(a)), None)
        if not float_compare(e) or x is None or not ir.is_var(e.outvars[0]):
            continue
        inl = ir.inline(_pin, [e.outvars[0], x])
        out.extend(ir.eqn_with_name_stack(q, "remat") for q in inl.eqns)
        consts.extend(inl.consts)
        env[e.outvars[0]] = inl.outs[0]
    return out, consts


def apply_post_ad(cj: ir.ClosedJaxpr, plan: Plan, remat, stats: Stats,
                  order_backward: bool = True, narrow: bool = True,
                  skip_kept: bool = True) -> ir.ClosedJaxpr:
    """``cj`` with the chosen segments' residuals recomputed (fenced) before first use.

    ``skip_kept``: leave out the outputs that stay live anyway (:func:`recomputed_segments`).
    """
    jaxpr = cj.jaxpr
    eqns = jaxpr.eqns
    B = plan.bwd_start
    # a fence keyed on a value made from constants alone is folded away by XLA
    varying = _input_dependent(jaxpr)
    produced_bwd = {v for e in eqns[B:] for v in e.outvars if ir.is_var(v) and v in varying}
    at: dict[int, list] = {}
    segs = (recomputed_segments(jaxpr, plan, remat) if skip_kept else
            [s for s, r in zip(plan.segments, remat) if r])
    for seg in segs:
        outs = set(seg.outputs)
        u = min(i for i in range(B, len(eqns)) if any(a in outs for a in eqns[i].invars
                                                      if ir.is_var(a)))
        at.setdefault(u, []).append(seg)
    env: dict = {}
    new_eqns, consts = _pinned_compares(eqns[:B], env)
    last = B  # backward equations before this index are already ordered before a fence
    for i in range(B, len(eqns)):
        e = eqns[i]
        for seg in at.get(i, ()):
            # a literal operand (e.g. a max's -inf init) is unhashable: not a backward value
            gs = [env.get(a, a) for a in e.invars
                  if ir.is_var(a) and a in produced_bwd and _float_var(a)]
            if order_backward:
                # XLA CPU defers weight/bias-gradient reductions to the update, keeping
                # each layer's big cotangents alive to the end: key the fence on every
                # backward value made since the last fence that nothing before here reads.
                gs += [env.get(v, v) for v in _frontier(eqns, last, i)
                       if v in varying and env.get(v, v) not in gs]
                last = i
            if not gs:  # the latest backward value made before this equation
                for prev in reversed(new_eqns[B:]):
                    gs = [v for v in prev.outvars if _float_var(v) and v in varying][:1]
                    if gs:
                        break
            if not gs:
                stats.note(f"remat: segment {seg.name} has no backward value to key its "
                           "fence on; used an optimization_barrier (XLA CPU may undo it)")
            fn = _segment_fun(jaxpr, seg)
            ng = len(gs)
            core, tail, via = _core_tail(jaxpr, seg) if narrow else (None, [], {})
            if tail:
                cmade = {v for x in core for v in x.outvars}
                read = [a for x in tail for a in x.invars] + list(seg.outputs)
                mid = list(dict.fromkeys(a for a in read if ir.is_var(a) and a in cmade))
                cfn = ir.jaxpr_as_fun(ir.closed(ir.make_jaxpr_from(
                    jaxpr, constvars=[], invars=list(seg.inputs), outvars=mid + list(via),
                    eqns=core, effects=frozenset())))
                tail = [x.replace(invars=[via.get(a, a) if ir.is_var(a) else a
                                          for a in x.invars]) for x in tail]
                tfn = ir.jaxpr_as_fun(ir.closed(ir.make_jaxpr_from(
                    jaxpr, constvars=[], invars=mid + list(via.values()) + list(seg.inputs),
                    outvars=list(seg.outputs), eqns=tail, effects=frozenset())))
                stats.hit("remat.fused_tail_eqns", len(tail))

                def fn2(*a, cfn=cfn, tfn=tfn, ng=ng):
                    return tfn(*fenced(cfn, a[:ng], *a[ng:]), *a[ng:])
            else:
                def fn2(*a, fn=fn, ng=ng):
                    return fenced(fn, a[:ng], *a[ng:])
            inl = ir.inline(fn2, list(gs) + [env.get(a, a) for a in seg.inputs])
            # the "remat" scope marks recomputations for reports and memory plots
            new_eqns.extend(ir.eqn_with_name_stack(x, "remat") for x in inl.eqns)
            consts.extend(inl.consts)
            env.update(zip(seg.outputs, inl.outs))
            stats.hit("remat.segment")
        new_in = [env.get(a, a) if ir.is_var(a) else a for a in e.invars]
        new_eqns.append(e.replace(invars=new_in) if new_in != list(e.invars) else e)
    outvars = [env.get(v, v) if ir.is_var(v) else v for v in jaxpr.outvars]
    new = ir.make_jaxpr_from(jaxpr, constvars=list(jaxpr.constvars) + [v for v, _ in consts],
                             outvars=outvars, eqns=new_eqns)
    return ir.closed(new, list(cj.consts) + [c for _, c in consts])


# ------------------------------------------------------------------------- the pass

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
            or remat_scan.scan_rematerialized(jaxpr)):
        return True
    return any(_rematerialized(ir.as_closed(sub).jaxpr) for e in jaxpr.eqns
               if e.primitive.name in ("jit", "pjit", "closed_call")
               for _, _, sub in ir.subjaxpr_params(e))


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
    original = inner  # micro-batches stream the program as given, not a rewritten one
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

    micro = remat_micro.MicroBatching(original, wrap, measure, budget_bytes, base, stats,
                                      micro_opt, positions, getattr(ctx, "arg_names", None))
    # a scan whose body has effects or random numbers is never recomputed: say so
    impure_scans = [ir.source_line(e) or "no source line" for e in inner.jaxpr.eqns
                    if e.primitive.name == "scan" and ir.impure(e)]
    if impure_scans:
        why = (f"; scan rewrite not possible for the scan(s) at {', '.join(impure_scans)}: "
               "their bodies have effects or random numbers")
        stats.note("remat:" + why[1:])
        micro.why += why
    done = micro.first()
    if done is not None:
        return done

    # Scans first: their stacked residuals are most of the memory and cheap to recompute
    # per iteration; the segment plan then works on what the scan rewrite leaves. Like
    # jax.checkpoint's policies, least recomputation first: recompute from kept dot
    # outputs (all, then those without batch dims), then from the carries alone.
    seg_base, scan_flops = base, 0.0
    seen, least = set(), None  # least: (bytes, plan, level) of the deepest level measuring least

    def build_scan(k, splan):
        return wrap(remat_scan.apply_scans(inner, splan, k))
    for keep in (remat_scan.KEEP_ORDER if ctx.option("remat_scan", True) else ()):
        splan = remat_scan.plan_scans(inner, keep)
        sig = (tuple(splan.order), tuple(splan.levels))
        if len(splan.levels) <= 1 or sig in seen:  # nothing to drop, or as before
            continue
        seen.add(sig)
        k_all = splan.levels[-1][0]
        m_all = measure(build_scan(k_all, splan))
        stats.note(f"remat: {len(splan.pairs)} forward/backward scan pair(s), "
                   f"{len(splan.order)} stacked residuals to drop "
                   f"({analysis.fmt_bytes(splan.residual_bytes)}); deepest level "
                   f"({remat_scan.level_desc(splan, k_all)}): {analysis.fmt_bytes(m_all)}")
        if m_all <= budget_bytes * 1.05:
            idx, prog, mem = remat_scan.choose_level(
                splan, functools.partial(build_scan, splan=splan), measure, base, m_all,
                budget_bytes, stats=stats)
            k, _, fl = splan.levels[idx]
            over = micro.over_scans(inner, fl)
            if over is not None:
                return over
            remat_scan.apply_scans(inner, splan, k, stats)  # the notes and hits of the choice
            return finish(prog, stats, f"solver scan-greedy ({remat_scan.level_desc(splan, k)})",
                          base, mem, budget_bytes, fl)
        if k_all != splan.base_k:  # chunking is chosen by the byte model: check XLA agrees
            m_base = measure(build_scan(splan.base_k, splan))
            if m_base <= m_all:
                stats.note(f"remat: chunked carries measure {analysis.fmt_bytes(m_all)}, no "
                           f"better than without ({analysis.fmt_bytes(m_base)}): not chunked")
                k_all, m_all = splan.base_k, m_base
        if least is None or m_all < least[0]:
            least = (m_all, splan, k_all)
    if least is not None and least[0] < base:  # no mode meets the budget: segments
        m_all, splan, k_all = least                 # continue from the least measured
        inner = remat_scan.apply_scans(inner, splan, k_all, stats)
        seg_base, scan_flops = m_all, next(fl for k, _, fl in splan.levels if k == k_all)
    plan = build_plan(inner, backward_start(inner.jaxpr), max_cuts=ctx.option("remat_max_cuts", 128))
    if not plan.segments:
        if seg_base < base:  # the scan rewrite is all there is
            return micro.below_floor(seg_base)
        stats.note("remat: no recomputable forward values reach the backward; nothing to drop")
        return micro.below_floor(base)

    order = ctx.option("remat_order_backward", "auto")
    if order not in ("auto", True, False):
        raise ValueError(f"remat: remat_order_backward must be 'auto', True or False, got {order!r}")

    narrow = ctx.option("remat_narrow_fence", "auto")
    if narrow not in ("auto", True, False):
        raise ValueError(f"remat: remat_narrow_fence must be 'auto', True or False, got {narrow!r}")

    skip = ctx.option("remat_skip_kept", "auto")
    if skip not in ("auto", True, False):
        raise ValueError(f"remat: remat_skip_kept must be 'auto', True or False, got {skip!r}")

    def build(remat, order_backward=None, narrow_fence=None, skip_kept=None):
        ob = order if order_backward is None else order_backward
        nf = narrow if narrow_fence is None else narrow_fence
        sk = skip if skip_kept is None else skip_kept
        return wrap(apply_post_ad(inner, plan, remat, Stats(), order_backward=ob,
                                  narrow=nf is not False, skip_kept=sk is not False))

    # The least-memory plan, measured once per rewrite variant: it fixes the variant XLA
    # keeps best (auto) and the smallest feasible budget, so infeasible budgets fail fast.
    # Each variant helps some models and costs on others (deep MLP: 8.5 MiB with kept
    # values skipped, no ordering, whole segments; GPT: 7.5 MiB with ordering, fused
    # tail, kept values recomputed), through XLA's scheduling and layout copies.
    least = solve_greedy(plan, 0)
    n_out = sum(len(s.outputs) for s, r in zip(plan.segments, least.remat) if r)
    if skip == "auto" and sum(len(s.outputs) for s in
                              recomputed_segments(inner.jaxpr, plan, least.remat)) == n_out:
        skip = True  # nothing to skip: both ways are the same program
    floors = {(ob, nf, sk): measure(build(least.remat, ob, nf, sk))
              for ob in ((True, False) if order == "auto" else (order,))
              for nf in ((True, False) if narrow == "auto" else (narrow,))
              for sk in ((True, False) if skip == "auto" else (skip,))}
    order, narrow, skip = min(floors, key=lambda k: (floors[k], *(not x for x in k)))
    floor = floors[order, narrow, skip]
    stats.note("remat: least-memory plan measures (backward ordered at fences / fusible "
               "tail outside the fence / kept values not recomputed) " + ", ".join(
                   "/".join("on" if x else "off" for x in k) + f" {analysis.fmt_bytes(m)}"
                   for k, m in floors.items()) + f"; kept {analysis.fmt_bytes(floor)}")
    if floor > budget_bytes * 1.05:
        # The byte model ignores XLA's fusion: a chosen segment can cost more than it
        # saves (CNN: 18 MiB with all three, 16 MiB without the stage-1 ones). Drop
        # chosen segments one at a time while the measured figure falls.
        cur, chosen = list(least.remat), [i for i, r in enumerate(least.remat) if r]
        if 1 < len(chosen) <= ctx.option("remat_refine_max", 20):
            for i in reversed(chosen):
                trial = list(cur)
                trial[i] = False
                m = measure(build(trial, order))
                if m < floor:
                    cur, floor = trial, m
            stats.note(f"remat: least-memory plan refined by dropping segments: "
                       f"{sum(cur)}/{len(chosen)} kept, {analysis.fmt_bytes(floor)}")
        if floor > budget_bytes * 1.05:
            return micro.below_floor(min(floor, seg_base))
        prog = wrap(apply_post_ad(inner, plan, cur, stats, order_backward=order,
                                  narrow=narrow, skip_kept=skip))
        return finish(prog, stats, "solver greedy+measured refinement", base, floor,
                      budget_bytes, _flops(inner, plan, cur, skip) + scan_flops)

    prog, sol, mem = choose(plan, build, measure, budget_bytes, seg_base,
                            solver=ctx.option("remat_solver", "auto"),
                            time_limit=ctx.option("remat_time_limit", 10.0), stats=stats,
                            known={tuple(least.remat): floor},
                            anchor=(least.model_bytes, floor))
    if not any(sol.remat) and seg_base == base:
        return PassResult(cj, False, stats)
    prog = wrap(apply_post_ad(inner, plan, sol.remat, stats, order_backward=order,
                              narrow=narrow, skip_kept=skip))
    return finish(prog, stats, f"solver {sol.solver} ({sol.seconds * 1e3:.1f} ms)", base,
                  mem, budget_bytes, _flops(inner, plan, sol.remat, skip) + scan_flops)


def _flops(cj, plan, remat, skip_kept) -> float:
    """FLOPs the rewrite really recomputes (outputs kept anyway are not recomputed)."""
    if not skip_kept:
        return plan.flops(remat)
    return float(sum(s.flops for s in recomputed_segments(cj.jaxpr, plan, remat)))


from .remat_pre import PRE_AD_SCOPE, apply_pre_ad, pre_ad_pass  # noqa: E402  (pre-AD placement)

register_pass(Pass("remat", remat_pass,
                   "rematerialize under memory_budget: recompute forward segments before "
                   "their backward uses (post-AD) or steer AD with fenced custom_vjp "
                   "segments (graphopt.remat, pre-AD)", "remat"))

__all__ = ["remat_pass", "apply_post_ad", "apply_pre_ad", "parse_budget",
           "fenced", "choose", "xla_temp", "estimated_temp", "next_target", "BudgetError",
           "remat_plan"]
