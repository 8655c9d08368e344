"""The post-AD schedule rewrite: each chosen segment's residuals recomputed, fenced,
right before their first backward use (:func:`apply_post_ad`).

The forward copies then die early. Values that stay live anyway (another chosen
segment's live-ins, e.g. a residual block's output) are not recomputed
(``remat_skip_kept``). Only a segment's non-fusible core runs in the fence
(:mod:`.fence`); its per-element tail runs after it on the fence's outputs, so XLA can
still fuse it into the backward consumers (``remat_narrow_fence``). With
``remat_order_backward`` each fence is also keyed on the backward values made since the
last one, so XLA cannot defer them past it.

Must not: recompute random, effectful or unknown primitives (the plan never offers
them) or reorder effects: only pure equations are duplicated, inside the fence.
"""
from __future__ import annotations

from graphopt import ir
from graphopt.interpreter import Stats

from .fence import fenced, float_var, materialize, pin
from .plan import Plan, float_compare, recomputed_segments


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
            if float_var(v) and v not in read]


def _input_dependent(jaxpr) -> set:
    """Vars whose value depends on the program's inputs (not on constants alone)."""
    dep = set(jaxpr.invars)
    for e in jaxpr.eqns:
        if any(ir.is_var(a) and a in dep for a in e.invars):
            dep.update(v for v in e.outvars if ir.is_var(v))
    return dep


def _chosen_and_compared(fwd) -> set:
    """Float values a max/min reduces and a comparison reads (``eq(x, max x)``): XLA would
    recompute ``x`` in both fusions and may round the copies apart (an ``rsqrt`` vectorized
    in one and not the other), leaving a column's mask empty and its gradient 0/0."""
    reduced = {e.invars[0] for e in fwd if e.primitive.name in ("reduce_max", "reduce_min")
               and ir.is_var(e.invars[0])}  # a literal is never recomputed (nor hashable)
    return {a for e in fwd if float_compare(e) for a in e.invars if a in reduced}


def _pinned_compares(fwd, env) -> tuple[list, list]:
    """The forward equations, each float comparison's result (a max's gradient mask)
    materialized once through a fence. Otherwise XLA fuses the comparison into each of
    its consumers, recomputing its operands there, and a rewrite that changes the fusion
    lets the copies round apart: a mask empty in one consumer, set in another. A value
    both reduced by a max/min and compared is materialized once too, before its first
    reader (:func:`_chosen_and_compared`)."""
    out, consts = [], []
    shared = _chosen_and_compared(fwd)
    for e in fwd:
        for a in dict.fromkeys(a for a in e.invars if ir.is_var(a) and a in shared):
            inl = ir.inline(materialize, [env.get(a, a)])  # before its first reader
            out.extend(ir.eqn_with_name_stack(q, "remat") for q in inl.eqns)
            consts.extend(inl.consts)
            env[a] = inl.outs[0]
            shared.discard(a)
        new_in = [env.get(a, a) if ir.is_var(a) else a for a in e.invars]
        out.append(e.replace(invars=new_in) if new_in != list(e.invars) else e)
        x = next((a for a in new_in if float_var(a)), None)
        if not float_compare(e) or x is None or not ir.is_var(e.outvars[0]):
            continue
        inl = ir.inline(pin, [e.outvars[0], x])
        out.extend(ir.eqn_with_name_stack(q, "remat") for q in inl.eqns)
        consts.extend(inl.consts)
        env[e.outvars[0]] = inl.outs[0]
    return out, consts


def _recompute_fn(jaxpr, seg, ng: int, narrow: bool, stats: Stats):
    """``fn(*keys, *seg.inputs) -> seg.outputs``: the segment recomputed behind a fence
    keyed on its first ``ng`` arguments; with ``narrow``, only its core inside the fence
    and its fusible tail after it (:func:`_core_tail`)."""
    core, tail, via = _core_tail(jaxpr, seg) if narrow else (None, [], {})
    if not tail:
        whole = _segment_fun(jaxpr, seg)
        return lambda *a: fenced(whole, a[:ng], *a[ng:])
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
    return lambda *a: tfn(*fenced(cfn, a[:ng], *a[ng:]), *a[ng:])


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
                  if ir.is_var(a) and a in produced_bwd and float_var(a)]
            if order_backward:
                # XLA CPU defers weight/bias-gradient reductions to the update, keeping
                # each layer's big cotangents alive to the end: key the fence on every
                # backward value made since the last fence that nothing before here reads.
                gs += [env.get(v, v) for v in _frontier(eqns, last, i)
                       if v in varying and env.get(v, v) not in gs]
                last = i
            if not gs:  # the latest backward value made before this equation
                for prev in reversed(new_eqns[B:]):
                    gs = [v for v in prev.outvars if float_var(v) and v in varying][:1]
                    if gs:
                        break
            if not gs:
                stats.note(f"remat: segment {seg.name} has no backward value to key its "
                           "fence on; used an optimization_barrier (XLA CPU may undo it)")
            fn = _recompute_fn(jaxpr, seg, len(gs), narrow, stats)
            inl = ir.inline(fn, list(gs) + [env.get(a, a) for a in seg.inputs])
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


def recomputed_flops(cj, plan: Plan, remat, skip_kept) -> float:
    """FLOPs the rewrite really recomputes (outputs kept anyway are not recomputed)."""
    if not skip_kept:
        return plan.flops(remat)
    return float(sum(s.flops for s in recomputed_segments(cj.jaxpr, plan, remat)))


__all__ = ["apply_post_ad", "recomputed_flops"]
