"""Micro-batch streaming for the post-AD remat pass.

Choosing what to keep cannot go below one layer's backward at full batch: the CNN's
stage-1 batch norm needs its input and its cotangent at once, two ``[16, 32, 32, 64]``
arrays (8 MiB) whatever is recomputed. This rewrite splits the batch instead. Every
value of a training step either carries the batch along one axis (*batched*: an image's
activations and cotangents) or does not (*global*: parameters, batch statistics,
gradients). Batched values mix examples only through *reductions* over the batch axis:
``reduce_sum``/``max``/``min`` over it, a ``dot_general`` or convolution contracting it
(weight gradients), a ``scatter-add`` of per-example rows into a global table, and
weight gradients made inside a ``scan`` body (per-layer outputs, accumulating carries).
So the program runs as a sequence of loops over K micro-batches: loop k recomputes, from
the micro-batch of the step's batched inputs, the batched values that the reductions of
level k read (level = how many reductions their inputs depend on), accumulates those
reductions, and the global equations that need them run between loops. Nothing batched
outlives its loop, so memory is one micro-batch's working set plus the globals. Without
batch norm there is one level (gradient accumulation: nothing recomputed); with it, the
forward is recomputed once per level (batch-norm statistics, loss, each stage's
backward).

What is batched is inferred: the leaves of the step's last argument (a step's ``batch``
comes last; :func:`batch_inputs`), then propagated through a rule table per primitive (:data:`RULES`, default: a primitive
not in the table that reads a batched value stops the rewrite, which the report names).
Every rule splits a computation exactly (a sum into partial sums), so results equal the
original up to the order of float additions. A batched value that a comparison reads
beside a max over the batch from an earlier loop (a max's gradient mask) is stored by
the first loop that computes it, not recomputed: XLA may round a recomputation
differently, and the comparison would then be false everywhere (:func:`_stash`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import analysis, ir, primitives

from .batch_rules import (RULES, Unstreamable, batch_inputs, batch_source,
                                check_accumulator,
                                check_linear, combine, identity, micro_params, rebuildable,
                                shape_of)
from .plan import float_compare

_CALLS = primitives.CALLS | {"custom_jvp_call"}


# ------------------------------------------------------------------ the scan rule

def _scan(e, in_axes, n):
    """A scan over batched operands: its body is classified like the program (a fixed
    point: a carry or constant the body reads per example becomes batched); sums over
    the batch inside the body (weight gradients) make the matching outputs sums."""
    nc, nk, nx = ir.scan_layout(e)
    body = ir.as_closed(e.params["jaxpr"])
    eqns, outvars = _flatten(body.jaxpr)
    invars = body.jaxpr.invars
    if any(a == 0 for a in in_axes[nc + nk:]):
        raise Unstreamable("scan runs over the batch axis")
    b_in = list(in_axes[:nc + nk]) + [None if a is None else a - 1 for a in in_axes[nc + nk:]]
    acc = set()  # carries that accumulate sums over the batch
    for _ in range(len(invars) + nk + 2):
        axis = {v: a for v, a in zip(invars, b_in) if a is not None}
        partial = {invars[nc + c]: "sum" for c in acc}
        how, aligned, wants = _classify(eqns, axis, n, partial)
        changed = False
        for v in wants - set(partial):
            if v not in invars[nc:nc + nk]:
                raise Unstreamable("scan body adds a global to a sum over the batch")
            acc.add(invars.index(v) - nc)
            changed = True
        for j, v in enumerate(invars):
            if v in aligned and b_in[j] is None:
                if len(aligned[v]) > 1:
                    raise Unstreamable("scan body reads an operand along two batch axes")
                b_in[j] = next(iter(aligned[v]))
                changed = True
        for c in range(nk):
            vo, j = outvars[c], nc + c
            if ir.is_var(vo) and vo in partial and c not in acc:
                acc.add(c)
                changed = True
            elif ir.is_var(vo) and vo in axis and b_in[j] is None:
                b_in[j] = axis[vo]
                changed = True
            elif ir.is_var(vo) and vo in axis and b_in[j] != axis[vo] or \
                    c in acc and not (ir.is_var(vo) and vo in partial) or \
                    b_in[j] is not None and not (ir.is_var(vo) and vo in axis):
                raise Unstreamable("scan carry changes its batch axis")
        if not changed:
            break
    base = {}  # each micro-batch starts the carry at zero; its init is added once after,
    for c in acc:  # to the final carry and to ys emitting the running sum as it is
        ys = check_accumulator(eqns, outvars, nk, invars[nc + c], outvars[c], partial)
        base.update({c: nc + c, **{nk + y: nc + c for y in ys}})
    if any(a == -1 for a in b_in):
        raise Unstreamable("scan body slices its xs along the batch axis")

    def out_of(v, shift):
        if not ir.is_var(v):
            return "same"
        if v in axis:
            return axis[v] + shift
        return partial.get(v, "same")
    outs = [out_of(v, 0) for v in outvars[:nk]] + [out_of(v, 1) for v in outvars[nk:]]
    op_axes = b_in[:nc + nk] + [None if a is None else a + 1 for a in b_in[nc + nk:]]
    return op_axes, outs, base, Body(eqns, outvars, how, axis, list(invars),
                                      list(body.jaxpr.constvars), list(body.consts))


RULES["scan"] = _scan  # here: it classifies the body with the analysis below


# ------------------------------------------------------------------ analysis

@dataclasses.dataclass
class How:
    op_axes: list     # per operand: the axis it is read along per micro-batch, or None
    outs: list        # per output: batch axis, or how micro-batch values combine
    base: dict = dataclasses.field(default_factory=dict)  # output -> operand that is
    # zeros per micro-batch and added once after the loop
    body: "Body | None" = None  # a scan's classified body


@dataclasses.dataclass
class Body:
    eqns: list
    outvars: list
    how: dict
    axis: dict
    invars: list
    constvars: list
    consts: list


def _flatten(jaxpr) -> tuple[list, list]:
    """Equations with pure call-like equations (jit, custom_jvp_call) inlined."""
    sub: dict = {}
    out = []

    def walk(eqns):
        for e in eqns:
            e = e.replace(invars=[sub.get(a, a) if ir.is_var(a) else a for a in e.invars])
            inner = next((j for _, _, j in ir.subjaxpr_params(e)), None)
            if (e.primitive.name in _CALLS and not ir.effectful(e) and inner is not None
                    and not ir.as_closed(inner).consts and not ir.pins_placement(e)):
                new, outs = ir.copy_eqns(ir.as_closed(inner).jaxpr, e.invars)
                walk(new)
                for v, o in zip(e.outvars, outs):
                    if not ir.is_dropvar(v):
                        sub[v] = sub.get(o, o) if ir.is_var(o) else o
            else:
                out.append(e)
    walk(jaxpr.eqns)
    return out, [sub.get(v, v) if ir.is_var(v) else v for v in jaxpr.outvars]


def _classify(eqns, axis: dict, n: int, partial: dict | None):
    """Rule per equation reading a batched value (others are global); fills ``axis``
    with every batched var. ``partial`` (inside a scan body; None at the top level)
    collects sums over the batch, which may only flow through linear ops.
    Returns (how per equation index, {global var: axes it is read along}, global vars
    added to sums)."""
    how, aligned, wants = {}, {}, set()
    for i, e in enumerate(eqns):
        in_axes = [axis.get(a) if ir.is_var(a) else None for a in e.invars]
        if partial is not None and any(ir.is_var(a) and a in partial for a in e.invars):
            wants.update(check_linear(e, partial, in_axes))
            partial.update((v, "sum") for v in e.outvars)
            continue
        if all(a is None for a in in_axes):
            continue
        if ir.effectful(e) or e.primitive.name in ir.RANDOM_PRIMITIVES:
            raise Unstreamable(f"{e.primitive} (effectful or random) reads a batched value")
        rule = RULES.get(e.primitive.name)
        if rule is None:
            raise Unstreamable(f"no batch rule for {e.primitive}, which reads a batched value")
        h = How(*rule(e, in_axes, n))
        # params hold numpy ints (broadcast_dimensions): plain ints from here on
        h.op_axes = [None if x is None else int(x) for x in h.op_axes]
        h.outs = [x if x is None or isinstance(x, str) else int(x) for x in h.outs]
        for x, ax in zip(e.invars, h.op_axes):
            if ax is not None and shape_of(x)[ax] != n:
                raise Unstreamable(f"{e.primitive}: operand axis {ax} is not the batch")
            if ax is not None and ir.is_var(x) and x not in axis:
                aligned.setdefault(x, set()).add(ax)
        for v, o in zip(e.outvars, h.outs):
            if o is None:
                raise Unstreamable(f"{e.primitive} drops the batch axis")
            if isinstance(o, int):
                axis[v] = o
            elif partial is not None:
                if h.base:  # the zeroed operand would have to be added back per iteration
                    raise Unstreamable(f"{e.primitive} accumulates onto a global inside a "
                                       "loop body")
                if o not in ("sum", "same"):
                    raise Unstreamable(f"{e.primitive}: a {o} over the batch inside a loop body")
                if o == "sum":
                    partial[v] = "sum"
        how[i] = h
    return how, aligned, wants


@dataclasses.dataclass
class Analysis:
    eqns: list                  # the program's equations, calls inlined
    outvars: list
    n: int                      # batch size
    batched_in: list            # per invar: batch axis or None
    axis: dict                  # var -> batch axis of every batched var
    how: dict                   # eqn index -> How (equations reading batched values)
    loop_of: dict               # eqn index with combined outputs -> loop (1-based)
    out_loop: dict              # index of a batched outvar -> loop that emits it
    n_loops: int
    cone: dict                  # loop -> batched equations it recomputes, in order
    stash: dict = dataclasses.field(default_factory=dict)  # var -> loop that stores it

    @property
    def batched_scans(self) -> int:
        """Scans over batched values: micro-batches run their iterations K times over."""
        return sum(h.body is not None for h in self.how.values())

    def recomputed_flops(self) -> float:
        """FLOPs run more than once: every loop recomputes its cone and its reductions
        (all micro-batches together are one full-batch pass), against one pass before."""
        runs = [i for j in self.cone for i in sorted(set(self.cone[j]) | {
            i for i, lp in self.loop_of.items() if lp == j})]
        flops = {i: analysis.eqn_cost(self.eqns[i]).flops for i in runs}
        return float(sum(flops[i] for i in runs) - sum(flops.values()))


def analyse(cj: ir.ClosedJaxpr, positions=None) -> Analysis:
    """Classify every equation as global, batched or combining over the batch, and give
    each combining one its loop (``positions``: see :func:`batch_inputs`). Raises
    :class:`Unstreamable` naming the obstacle."""
    jaxpr = cj.jaxpr
    n, batched_in = batch_inputs(jaxpr, positions)
    eqns, outvars = _flatten(jaxpr)
    bad = next((e for e in eqns if ir.effectful(e)), None)
    if bad is not None:  # loops would reorder it against the rest
        raise Unstreamable(f"{bad.primitive} has effects")
    axis = {v: a for v, a in zip(jaxpr.invars, batched_in) if a is not None}
    how, _, _ = _classify(eqns, axis, n, None)
    level = dict.fromkeys(axis, 0)  # var -> loops it waits for
    same = {}  # batch-independent outputs: a loop's later equations read them at once
    loop_of = {}
    for i, e in enumerate(eqns):
        h = how.get(i)
        lv = level if h is None else {**level, **same}
        need = max((lv.get(a, 0) for a in e.invars if ir.is_var(a)), default=0)
        if h is not None and any(isinstance(o, str) for o in h.outs):
            loop_of[i] = need + 1
        for k, v in enumerate(e.outvars):
            o = h.outs[k] if h is not None else None
            level[v] = need + isinstance(o, str)
            if o == "same":
                same[v] = need
    out_loop = {j: level.get(v, 0) + 1 for j, v in enumerate(outvars)
                if ir.is_var(v) and v in axis}
    if not loop_of:
        raise Unstreamable("nothing reduces over the batch")
    n_loops = max([*loop_of.values(), *out_loop.values()])
    args = (eqns, outvars, {**axis, **same}, loop_of, out_loop, n_loops)
    cone = _cones(*args)
    stash = _stash(eqns, how, axis, level, loop_of, cone)
    return Analysis(eqns, outvars, n, batched_in, axis, how, loop_of, out_loop, n_loops,
                    _cones(*args, stash) if stash else cone, stash)


def _stash(eqns, how, axis, level, loop_of, cone) -> dict:
    """Batched values that a comparison reads beside a global made by an earlier loop
    (a max's gradient mask ``eq(x, max x)``) and that more than one loop computes: var
    -> the first loop, which stores them for the later ones. XLA rounds the same dot
    differently in two loop bodies (7e-7 apart), and the mask would come out empty."""
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    stash = {}
    for i in how:
        e = eqns[i]
        if not float_compare(e) or not any(a not in axis and level.get(a, 0) > 0
                                           for a in e.invars):
            continue
        for p in {producer[a] for a in e.invars if a in axis and a in producer}:
            loops = {j for j, c in cone.items() if p in c} | (
                {loop_of[p]} if p in loop_of else set())
            if len(loops) > 1:  # all its batched outputs, so that nothing re-runs it
                stash.update((v, min(loops)) for v in eqns[p].outvars if v in axis)
    return stash


def _cones(eqns, outvars, axis, loop_of, out_loop, n_loops, stash=None) -> dict:
    """Per loop, the batched equations its combining equations and batched outputs read
    (up to the values an earlier loop stored: ``stash``)."""
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    stash = stash or {}
    cone = {}
    for j in range(1, n_loops + 1):
        todo = [v for i, lp in loop_of.items() if lp == j for v in eqns[i].invars]
        todo += [outvars[o] for o, lp in out_loop.items() if lp == j]
        seen = set()
        while todo:
            v = todo.pop()
            i = producer.get(v) if ir.is_var(v) and v in axis and stash.get(v, j) >= j \
                else None
            if i is None or i in seen:
                continue
            seen.add(i)
            todo.extend(eqns[i].invars)
        cone[j] = sorted(seen)
    return cone


# ------------------------------------------------------------------ rewrite

def _read(env, a):
    return ir.literal_value(a) if ir.is_literal(a) else env[a]


def _run_as_is(e, env):
    """Evaluate equation ``e`` on whole values from ``env`` into ``env``."""
    env.update(zip(e.outvars, ir.bind_eqn(e, [_read(env, a) for a in e.invars])))


class _Micro:
    """Re-runs classified equations on micro-batch ``idx`` (a tracer) of size ``m``."""

    def __init__(self, m: int, idx):
        self.m, self.idx = m, idx

    def run(self, eqns, how, axis, env, order, partials=None):
        """Evaluate ``eqns[i]`` for ``i`` in ``order`` into ``env``: batched vars hold
        micro-batch values, global vars whole ones. ``partials`` (the top level): where a
        micro-batch's part of a sum/max/min goes, so that an equation re-run in a later
        loop for its batched outputs never overwrites the global made by its own loop."""
        producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
        memo: dict = {}

        def micro_global(v, ax):
            # a global with a batch-sized axis read per example: rebuilt when it is a
            # broadcast (zeros, a scalar), else sliced
            if (v, ax) not in memo:
                i = producer.get(v)
                if i is not None and rebuildable(eqns[i], ax):
                    e = eqns[i]
                    memo[v, ax] = ir.bind_eqn(e, [_read(env, a) for a in e.invars],
                                              **micro_params(e, [ax], self.m))[0]
                else:
                    memo[v, ax] = lax.dynamic_slice_in_dim(env[v], self.idx * self.m,
                                                           self.m, axis=ax)
            return memo[v, ax]

        for i in order:
            e, h = eqns[i], how.get(i)
            if h is None:  # global (or a sum flowing through a linear op): as it is
                _run_as_is(e, env)
                continue
            vals = [_read(env, a) if ax is None or not ir.is_var(a) else
                    env[a] if a in axis else micro_global(a, ax)
                    for a, ax in zip(e.invars, h.op_axes)]
            for j in set(h.base.values()):
                vals[j] = jnp.zeros_like(vals[j])
            if h.body is not None:
                outs = self.scan(e, h.body, vals)
            else:
                outs = ir.bind_eqn(e, vals, **micro_params(e, h.outs, self.m))
            for v, o, x in zip(e.outvars, h.outs, outs):
                if partials is not None and o in ("sum", "max", "min"):
                    partials[v] = x
                else:
                    env[v] = x

    def scan(self, e, body: Body, vals):
        nc, nk, _ = ir.scan_layout(e)

        def step(carry, xs):
            env = dict(zip(body.constvars, body.consts))
            env.update(zip(body.invars, list(vals[:nc]) + list(carry) + list(xs)))
            self.run(body.eqns, body.how, body.axis, env, range(len(body.eqns)))
            outs = [_read(env, v) for v in body.outvars]
            return outs[:nk], outs[nk:]
        carry, ys = lax.scan(step, list(vals[nc:nc + nk]), list(vals[nc + nk:]),
                             length=e.params["length"], reverse=e.params["reverse"],
                             unroll=e.params["unroll"])
        return list(carry) + list(ys)


def stream(cj: ir.ClosedJaxpr, k: int, an: Analysis | None = None) -> ir.ClosedJaxpr:
    """``cj`` run over ``k`` micro-batches (``k`` divides the batch)."""
    an = an or analyse(cj)
    if an.n % k:
        raise ValueError(f"remat: {k} micro-batches do not divide the batch of {an.n}")
    m = an.n // k
    eqns, jaxpr = an.eqns, cj.jaxpr

    def run(*args):
        env = dict(zip(jaxpr.constvars, cj.consts))
        env.update(zip(jaxpr.invars, args))
        done = set()

        def run_globals():  # every global equation whose inputs exist by now, in order
            for i, e in enumerate(eqns):
                if i not in an.how and i not in done and \
                        all(not ir.is_var(a) or a in env for a in e.invars):
                    done.add(i)
                    _run_as_is(e, env)
        xs_in = [(v, a.reshape((k, m) + a.shape[1:])) for v, a, ax in
                 zip(jaxpr.invars, args, an.batched_in) if ax is not None]
        stored: list = []  # (var, [k, micro-batch value]) a loop keeps for later ones
        for j in range(1, an.n_loops + 1):
            run_globals()
            reds = [i for i, lp in an.loop_of.items() if lp == j]
            comb = [(i, kd, v) for i in reds for kd, v in zip(an.how[i].outs, eqns[i].outvars)
                    if isinstance(kd, str)]
            outs = [o for o, lp in an.out_loop.items() if lp == j]
            keep = [v for v, lp in an.stash.items() if lp == j]

            def body(acc, i, reds=reds, comb=comb, outs=outs, keep=keep, j=j):
                # acc None: the first micro-batch, run before a loop of k - 1; its partial
                # results start the accumulators (no zero fill, one add fewer: 2-3 points
                # of the GPT step's time on an H200)
                benv = dict(env)
                benv.update((v, lax.dynamic_index_in_dim(x, i, keepdims=False))
                            for v, x in xs_in + stored)
                order = sorted(set(an.cone[j]) | set(reds))
                parts: dict = {}
                _Micro(m, i).run(eqns, an.how, an.axis, benv, order, parts)
                got = [(parts[v] if v in parts else benv[v]).astype(v.aval.dtype)
                       for _, _, v in comb]
                acc = got if acc is None else [combine(kd, a, p) for (_, kd, _), a, p in
                                               zip(comb, acc, got)]
                return acc, [benv[an.outvars[o]] for o in outs] + [benv[v] for v in keep]
            idx = jnp.arange(k)
            with jax.named_scope(f"remat/stream{j}"):
                if k > 2:
                    with jax.named_scope("first"):
                        acc, y0 = body(None, idx[0])
                    acc, ys = lax.scan(body, acc, idx[1:])
                    ys = [jnp.concatenate([a[None], b]) for a, b in zip(y0, ys)]
                else:  # a loop of one would be inlined: two micro-batches in straight-line
                    # code measure 31.8 MiB of the deep MLP's 36.5 on CPU, a loop of two 18.0
                    acc, ys = lax.scan(body, [identity(kd, v.aval) for _, kd, v in comb], idx)
            for (i, kd, v), a in zip(comb, acc):
                base = an.how[i].base.get(eqns[i].outvars.index(v))
                if base is not None:
                    x = eqns[i].invars[base]
                    a = a + _read(env, x)
                env[v] = a.astype(v.aval.dtype)
            stored += zip(keep, ys[len(outs):])
            for o, y in zip(outs, ys):
                v = an.outvars[o]
                env[v] = jnp.moveaxis(y, 0, an.axis[v]).reshape(v.aval.shape)
        run_globals()
        return [_read(env, v) for v in an.outvars]

    new = ir.trace_flat(run, [v.aval for v in jaxpr.invars])
    return ir.closed(ir.dce_same_interface(new.jaxpr), new.consts)


def micro_batch_counts(n: int) -> list[int]:
    """Numbers of micro-batches to try, fewest first: the divisors of ``n`` above 1."""
    return [k for k in range(2, n + 1) if n % k == 0]


__all__ = ["Unstreamable", "Analysis", "RULES", "analyse", "batch_inputs", "batch_source", "stream",
           "micro_batch_counts"]
