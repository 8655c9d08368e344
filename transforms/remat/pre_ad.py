"""Pre-AD rematerialization: steer what ``jax.grad`` saves, under a byte budget.

:func:`pre_ad_pass` (the remat pass on a program with no backward pass: ``graphopt.remat``
or ``graphopt.optimize(loss, memory_budget=...)``) takes a model or loss, cuts its equations into
segments (:mod:`.plan`) and turns each segment the solver picks into a
``jax.custom_vjp`` function: its forward saves only the segment's inputs, its backward
recomputes the segment and takes its VJP inside a fenced ``lax.cond`` keyed on the
incoming cotangent (see :func:`.fence.fenced`), so XLA keeps the
recomputation. Which values AD would save is estimated (inputs of non-linear
primitives); the choice is then checked against XLA's temp memory of the
differentiated program.

Scanned layers (``lax.scan``, one equation here) are handled first: their body is
wrapped in ``jax.checkpoint`` with a policy, so AD's scan saves per iteration only what
the policy keeps (:func:`checkpoint_scans`). Levels from least to most recomputation:
``dots_saveable``, ``dots_with_no_batch_dims_saveable``, ``nothing_saveable`` (carries
only; the rows of :data:`.policies.POLICIES`); the cheapest level whose measured memory
meets the budget wins, else the deepest one and the segment solver continues on the
rest of the function.

Must not: wrap equations that are random, effectful or unknown (their chunk runs as
is), or change the function's outputs or gradients.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from graphopt import analysis, ir
from graphopt.interpreter import Stats
from graphopt.passes import PassResult

from .budget import TOLERANCE, choose, infeasible, parse_budget, specs
from .fence import fenced
from .plan import Plan, build_plan, recomputable
from .policies import SCAN_LEVELS, policy, saved
from .solvers import solve_greedy

# The name scope of what this module rewrote: a second run leaves such a program alone.
PRE_AD_SCOPE = "remat_pre_ad"

# Primitives whose VJP needs none of their inputs: their operands are not residuals.
LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze",
    "expand_dims", "convert_element_type", "reduce_sum", "concatenate", "slice", "pad",
    "copy", "copy_p", "real", "imag", "rev", "dynamic_slice", "dynamic_update_slice",
    "gather", "select_n", "cumsum", "stop_gradient",
})


def ad_residuals(jaxpr) -> set:
    """Vars AD is likely to save: operands of non-linear primitives."""
    out = set()
    for e in jaxpr.eqns:
        if e.primitive.name in LINEAR:
            if e.primitive.name == "select_n" and ir.is_var(e.invars[0]):
                out.add(e.invars[0])
            continue
        out.update(a for a in e.invars if ir.is_var(a))
        if e.primitive.name in ("exp", "tanh", "logistic", "sqrt", "rsqrt"):
            out.update(v for v in e.outvars if ir.is_var(v))
    return out


def _is_float(aval) -> bool:
    return ir.is_array_aval(aval) and jnp.issubdtype(aval.dtype, jnp.inexact)


def _checkpointed(fn, in_avals, out_avals):
    """``fn`` as a custom_vjp whose backward recomputes it (fenced) and takes its VJP."""
    fin = [i for i, a in enumerate(in_avals) if _is_float(a)]
    fout = [i for i, a in enumerate(out_avals) if _is_float(a)]

    @jax.custom_vjp
    def seg(*xs):
        return tuple(fn(*xs))

    def fwd(*xs):
        return tuple(fn(*xs)), xs

    def bwd(xs, gs):
        gsf = [gs[i] for i in fout]

        def vjp_of(*ops):
            xs_, g_ = list(ops[:len(xs)]), ops[len(xs):]

            def f_float(*fx):
                full = list(xs_)
                for i, v in zip(fin, fx):
                    full[i] = v
                outs = fn(*full)
                return [outs[i] for i in fout]
            _, vjp = jax.vjp(f_float, *[xs_[i] for i in fin])
            return tuple(vjp(list(g_)))
        grads = fenced(vjp_of, gsf, *xs, *gsf)
        res = [None] * len(xs)
        for i, g in zip(fin, grads):
            res[i] = g
        return tuple(res)

    seg.defvjp(fwd, bwd)
    return seg


def _chunk(jaxpr, a, b, later_reads):
    eqns = jaxpr.eqns[a:b]
    made, inputs, seen = set(), [], set()
    for e in eqns:
        for x in e.invars:
            if ir.is_var(x) and x not in made and x not in seen:
                seen.add(x)
                inputs.append(x)
        made.update(v for v in e.outvars if ir.is_var(v))
    outputs = [v for e in eqns for v in e.outvars if ir.is_var(v) and v in later_reads]
    sub = ir.make_jaxpr_from(jaxpr, constvars=[], invars=inputs, outvars=outputs, eqns=eqns,
                             effects=ir.eqns_effects(eqns))
    return inputs, outputs, ir.closed(sub)


def apply_pre_ad(cj: ir.ClosedJaxpr, plan: Plan, remat, stats: Stats | None = None
                 ) -> ir.ClosedJaxpr:
    """``cj`` with each chosen segment's equations behind a fenced custom_vjp."""
    stats = stats if stats is not None else Stats()
    jaxpr = cj.jaxpr
    n = len(jaxpr.eqns)
    bounds = []
    pos = 0
    for seg, r in zip(plan.segments, remat):
        if not r:
            continue
        if any(not recomputable(e) for e in jaxpr.eqns[seg.start:seg.stop]):
            stats.note(f"remat: segment {seg.name} holds a random/effectful/unknown "
                       "equation; left as is")
            continue
        if seg.start > pos:
            bounds.append((pos, seg.start, False))
        bounds.append((seg.start, seg.stop, True))
        pos = seg.stop
    if pos < n:
        bounds.append((pos, n, False))
    # reads at or after each boundary (for chunk outputs)
    reads_from = [set() for _ in range(n + 1)]
    acc = {v for v in jaxpr.outvars if ir.is_var(v)}
    reads_from[n] = set(acc)
    for i in range(n - 1, -1, -1):
        acc |= {x for x in jaxpr.eqns[i].invars if ir.is_var(x)}
        reads_from[i] = set(acc)
    chunks = []
    for a, b, r in bounds:
        ins, outs, sub = _chunk(jaxpr, a, b, reads_from[b])
        f = ir.jaxpr_as_fun(sub)
        if r:
            f = _checkpointed(f, [v.aval for v in ins], [v.aval for v in outs])
            stats.hit("remat.segment")
        chunks.append((ins, outs, f))

    def run(*args):
        env = dict(zip(jaxpr.constvars, cj.consts))
        env.update(zip(jaxpr.invars, args))
        with jax.named_scope(PRE_AD_SCOPE):  # marks the program as rewritten (idempotence)
            for ins, outs, f in chunks:
                env.update(zip(outs, f(*[env[v] for v in ins])))
        return [env[v] if ir.is_var(v) else ir.literal_value(v) for v in jaxpr.outvars]

    return ir.trace_flat(run, cj.in_avals)


def _checkpointable_scan(e) -> bool:
    # A body the user already checkpointed keeps the user's policy.
    return (e.primitive.name == "scan" and recomputable(e)
            and not any(ir.is_checkpoint(b) for b in e.params["jaxpr"].jaxpr.eqns))


def checkpoint_scans(cj: ir.ClosedJaxpr, level: str):
    """(``cj`` with each top-level pure scan's body under ``jax.checkpoint`` with the
    policy of ``level``, FLOPs the backward recomputes, number of scans rewritten)."""
    keep = policy(level).jax_policy
    eqns, flops, n = list(cj.jaxpr.eqns), 0.0, 0
    for i, e in enumerate(eqns):
        if not _checkpointable_scan(e):
            continue
        body = e.params["jaxpr"]
        # prevent_cse=False: the backward scan body is another loop, XLA cannot merge it.
        f = jax.checkpoint(ir.jaxpr_as_fun(body), policy=keep, prevent_cse=False)
        eqns[i] = ir.eqn_with_name_stack(ir.map_subjaxprs(
            e, lambda sub, is_open, f=f: ir.trace_flat(f, sub.in_avals)), PRE_AD_SCOPE)
        flops += e.params["length"] * sum(analysis.eqn_cost(b).flops for b in body.jaxpr.eqns
                                          if not saved(b, level))
        n += 1
    return ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=eqns), cj.consts), flops, n


def grad_program(cj: ir.ClosedJaxpr):
    """The differentiated program AD builds from ``cj``: d(sum of float outputs)/d(float inputs)."""
    fin = [i for i, a in enumerate(cj.in_avals) if _is_float(a)]

    def g(*args):
        def scalar(*fx):
            full = list(args)
            for i, v in zip(fin, fx):
                full[i] = v
            outs = ir.eval_jaxpr(cj, *full)
            return sum(jnp.sum(o.astype(jnp.float32)) for o in outs if _is_float(ir.aval_of(o)))
        return jax.grad(scalar, argnums=tuple(range(len(fin))))(*[args[i] for i in fin])
    return g


def grad_temp(cj: ir.ClosedJaxpr) -> int:
    return analysis.xla_memory(grad_program(cj), *specs(cj))["temp_bytes"]


def remat_jaxpr_pre_ad(cj, memory_budget, solver="auto", max_cuts=128, time_limit=10.0,
                       tolerance=TOLERANCE, stats: Stats | None = None):
    """(rewritten closed jaxpr, info dict) for a function that AD will differentiate."""
    stats = stats if stats is not None else Stats()
    base = grad_temp(cj)
    budget_bytes = parse_budget(memory_budget, base)
    info = {"placement": "pre-AD", "base_bytes": base, "budget_bytes": budget_bytes,
            "stats": stats}
    if budget_bytes >= base:
        stats.note(f"remat: budget {analysis.fmt_bytes(budget_bytes)} >= un-rematerialized "
                   f"temp {analysis.fmt_bytes(base)} of the differentiated program: no-op")
        info.update(bytes=base, flops=0.0, solver=None)
        return cj, info
    seg_base, scan_flops = base, 0.0
    if any(_checkpointable_scan(e) for e in cj.jaxpr.eqns):
        info["scan_levels"] = []
        for name, _ in SCAN_LEVELS:   # least recomputation first
            cand, fl, n = checkpoint_scans(cj, name)
            mem = grad_temp(cand)
            info["scan_levels"].append((name, mem, fl))
            stats.note(f"remat: {n} scan bodies under jax.checkpoint({name}): "
                       f"{analysis.fmt_bytes(mem)}, recomputes {analysis.fmt_flops(fl)}")
            if mem <= budget_bytes * (1 + tolerance):
                stats.hit("remat.scan_checkpointed", n)
                info.update(bytes=mem, flops=fl, solver=f"scan-checkpoint ({name})",
                            seconds=0.0, segments=0)
                return cand, info
        # none meets the budget: the segments continue from the level with the least
        # memory, if it beats no checkpoint at all
        name, mem, fl = min(info["scan_levels"], key=lambda t: t[1])
        if mem < base:
            cj, n = checkpoint_scans(cj, name)[::2]
            stats.hit("remat.scan_checkpointed", n)
            seg_base, scan_flops = mem, fl
    # dots_kept_span=0: a custom_vjp segment recomputes all of its range (saves its inputs)
    plan = build_plan(cj, None, residuals=ad_residuals(cj.jaxpr), max_cuts=max_cuts,
                      dots_kept_span=0)
    if not plan.segments:
        if seg_base < base:
            raise infeasible(budget_bytes, seg_base, base)
        stats.note("remat: nothing recomputable; no-op")
        info.update(bytes=base, flops=0.0, solver=None)
        return cj, info
    # The least-memory plan first: an infeasible budget fails after one compile, and the
    # line through it and no remat gives the first target (XLA keeps far fewer bytes than
    # the model counts: GPT on a GPU 0.3-0.4 per model byte).
    least = solve_greedy(plan, 0)
    build = functools.partial(apply_pre_ad, cj, plan)
    floor = grad_temp(build(least.remat))
    if floor > budget_bytes * (1 + tolerance):
        raise infeasible(budget_bytes, min(floor, seg_base), base)
    prog, sol, mem = choose(plan, build, grad_temp, budget_bytes, seg_base, solver=solver,
                            time_limit=time_limit, tolerance=tolerance, stats=stats,
                            known={tuple(least.remat): floor},
                            anchor=(least.model_bytes, floor))
    info.update(bytes=mem, flops=sol.flops + scan_flops, solver=sol.solver,
                seconds=sol.seconds, segments=sum(sol.remat))
    return prog, info


def pre_ad_pass(cj: ir.ClosedJaxpr, ctx, stats: Stats) -> PassResult:
    """The remat pass on a program holding no backward pass (a model or loss that
    ``jax.grad`` will differentiate): steer what AD saves. ``stats.details`` gets the
    info dict (``graphopt.remat(...).info``)."""
    stats.details["placement"] = "pre-AD"
    if not any(map(_is_float, cj.in_avals)) or not any(map(_is_float, cj.out_avals)):
        stats.note("remat: pre-AD: no float input or output, nothing for jax.grad to "
                   "differentiate; left as is")
        return PassResult(cj, False, stats)
    try:
        jax.make_jaxpr(grad_program(cj))(*specs(cj))
    except (TypeError, ValueError) as exc:  # JAX cannot differentiate it (while_loop, ...)
        stats.note(f"remat: pre-AD: jax.grad cannot differentiate this program "
                   f"({type(exc).__name__}: {str(exc).splitlines()[0]}); left as is")
        return PassResult(cj, False, stats)
    prog, info = remat_jaxpr_pre_ad(cj, ctx.option("memory_budget"),
                                    solver=ctx.option("remat_solver", "auto"),
                                    max_cuts=ctx.option("remat_max_cuts", 128),
                                    time_limit=ctx.option("remat_time_limit", 10.0),
                                    stats=stats)
    stats.details.update(info)
    if prog is not cj:
        stats.hit("remat.bytes_saved", int(info["base_bytes"] - info["bytes"]))
        stats.hit("remat.flops_recomputed", int(info["flops"]))
    return PassResult(prog, prog is not cj, stats)


__all__ = ["apply_pre_ad", "ad_residuals", "remat_jaxpr_pre_ad", "pre_ad_pass", "PRE_AD_SCOPE",
           "grad_program", "grad_temp", "LINEAR"]
