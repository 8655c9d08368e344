"""Micro-batch streaming: the post-AD remat pass's last resort below its floor.

Choosing what to keep cannot go below one layer's backward at full batch: the CNN's
stage-1 batch norm needs its input and its cotangent at once, two ``[16, 32, 32, 64]``
arrays (8 MiB) whatever is recomputed. This rewrite splits the batch instead. Every
value of a training step either carries the batch along one axis (*batched*: an image's
activations and cotangents) or does not (*global*: parameters, batch statistics,
gradients). Batched values mix examples only through *reductions* over the batch axis:
``reduce_sum``/``max``/``min`` over it, a ``dot_general`` or convolution contracting it
(weight gradients), a ``scatter-add`` of per-example rows into a global table. So the
program runs as a sequence of loops over K micro-batches: loop k recomputes, from the
micro-batch of the step's batched inputs, the batched values that the reductions of
level k read (level = how many reductions their inputs depend on), accumulates those
reductions, and the global equations that need them run between loops. Nothing batched
outlives its loop, so memory is one micro-batch's working set plus the globals; the
price is the forward recomputed once per level (batch-norm statistics, loss, each
stage's backward).

What is batched is inferred: the trailing run of the step's arguments whose leading
dimension has the size ``n`` of the last argument's (a step's ``batch`` comes last),
then propagated through a rule table per primitive (:data:`RULES`, default: a primitive
not in the table that reads a batched value stops the rewrite, which the report names).
Sums are accumulated in micro-batch order, so results equal the original up to
float rounding (~1e-7 relative, like any change of summation order).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import analysis, ir

_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})


class Unstreamable(Exception):
    """The program cannot be split along its batch (the message says where)."""


# ------------------------------------------------------------------ rule table
# rule(eqn, in_axes, n) -> (operand_axes, out_axes, reduction):
#   in_axes[i]: batch axis of operand i, or None when it is global;
#   operand_axes[i]: the axis along which operand i is read per micro-batch (None:
#     whole; a global with an axis is sliced or rebuilt at micro-batch size);
#   out_axes: batch axis of each output (None: global);
#   reduction: None, or how partial results combine across micro-batches
#     ("sum", "max", "min", "scatter": a sum onto the operand, which is added once).

def _shape(a):
    return tuple(a.aval.shape) if ir.is_var(a) else tuple(getattr(ir.aval_of(a), "shape", ()))


def _common_axis(e, in_axes):
    got = {a for a in in_axes if a is not None}
    if len(got) != 1:
        raise Unstreamable(f"{e.primitive} mixes operands batched along axes {sorted(got)}")
    return got.pop()


def _aligned(e, in_axes, a, n):
    """Operand axes of a same-shape (elementwise-like) op batched along ``a``."""
    out = []
    for x, ax in zip(e.invars, in_axes):
        s = _shape(x)
        if ax is not None or (len(s) > a and s[a] == n):
            out.append(a)
        elif len(s) == 0 or s[a] == 1:
            out.append(None)  # a scalar or a size-1 (degenerate broadcast) axis
        else:
            raise Unstreamable(f"{e.primitive} operand of shape {s} does not line up "
                               f"with the batch axis {a}")
    return out


def _elementwise(e, in_axes, n):
    a = _common_axis(e, in_axes)
    return _aligned(e, in_axes, a, n), [a] * len(e.outvars), None


def _reduce(kind):
    def rule(e, in_axes, n):
        (a,) = in_axes
        axes = tuple(e.params["axes"])
        if a in axes:
            if kind is None:
                raise Unstreamable(f"{e.primitive} over the batch axis has no partial form")
            return [a], [None], kind
        return [a], [a - sum(x < a for x in axes)], None
    return rule


def _axis_param(name):
    def rule(e, in_axes, n):
        a = _common_axis(e, in_axes)
        if e.params[name] == a:
            raise Unstreamable(f"{e.primitive} runs along the batch axis")
        return _aligned(e, in_axes, a, n), [a] * len(e.outvars), None
    return rule


def _broadcast_in_dim(e, in_axes, n):
    a = in_axes[0]
    return [a] + [None] * (len(e.invars) - 1), [e.params["broadcast_dimensions"][a]], None


def _reshape_axis(in_shape, a, out_shape):
    before = math.prod(in_shape[:a])
    for b, size in enumerate(out_shape):
        if math.prod(out_shape[:b]) == before and size == in_shape[a]:
            return b
    return None


def _reshape(e, in_axes, n):
    a = in_axes[0]
    b = _reshape_axis(_shape(e.invars[0]), a, _shape(e.outvars[0]))
    if b is None or e.params.get("dimensions") is not None:
        raise Unstreamable("reshape merges or splits the batch axis")
    return [a] + [None] * (len(e.invars) - 1), [b], None


def _squeeze(e, in_axes, n):
    a = in_axes[0]
    dims = tuple(e.params["dimensions"])
    return [a], [a - sum(d < a for d in dims)], None


def _transpose(e, in_axes, n):
    a = in_axes[0]
    return [a], [tuple(e.params["permutation"]).index(a)], None


def _untouched(param, what):
    """Ops whose ``param`` lists per-axis settings that must leave the batch axis alone."""
    def rule(e, in_axes, n):
        a = _common_axis(e, in_axes)
        if not what(e.params[param], a, n):
            raise Unstreamable(f"{e.primitive} changes the batch axis ({param})")
        return _aligned(e, in_axes, a, n), [a] * len(e.outvars), None
    return rule


def _slice(e, in_axes, n):
    (a,) = in_axes
    p = e.params
    if p["start_indices"][a] != 0 or p["limit_indices"][a] != n or \
            (p["strides"] and p["strides"][a] != 1):
        raise Unstreamable("slice cuts the batch axis")
    return [a], [a], None


def _dot_general(e, in_axes, n):
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    al, ar = in_axes
    nl, nr = len(_shape(e.invars[0])), len(_shape(e.invars[1]))
    lfree = [d for d in range(nl) if d not in lc and d not in lb]
    if al is not None:
        if al in lc:
            j = lc.index(al)
            if ar not in (None, rc[j]):
                raise Unstreamable("dot_general contracts the batch with another axis")
            return [al, rc[j]], [None], "sum"
        if al in lb:
            j = lb.index(al)
            if ar not in (None, rb[j]):
                raise Unstreamable("dot_general pairs the batch with another axis")
            return [al, rb[j]], [j], None
        if ar is not None:
            raise Unstreamable("dot_general multiplies two batches (outer product)")
        return [al, None], [len(lb) + lfree.index(al)], None
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    if ar in rc:
        return [lc[rc.index(ar)], ar], [None], "sum"
    if ar in rb:
        j = rb.index(ar)
        return [lb[j], ar], [j], None
    return [None, ar], [len(lb) + len(lfree) + rfree.index(ar)], None


def _conv(e, in_axes, n):
    lhs_spec, rhs_spec, out_spec = e.params["dimension_numbers"]
    al, ar = in_axes
    plain = e.params["feature_group_count"] == 1 and e.params["batch_group_count"] == 1
    if al == lhs_spec[0] and ar is None and e.params["batch_group_count"] == 1:
        return [al, None], [out_spec[0]], None  # forward or input gradient
    if plain and al == lhs_spec[1] and ar == rhs_spec[1]:
        return [al, ar], [None], "sum"  # weight gradient: contracts the batch
    raise Unstreamable("conv_general_dilated reads the batch other than as its batch "
                       "dimension or a weight gradient's contraction")


def _gather(e, in_axes, n):
    dn = e.params["dimension_numbers"]
    ao, ai = in_axes
    n_idx = len(_shape(e.invars[1]))
    if ai is None or ai == n_idx - 1:
        raise Unstreamable("gather picks rows across the batch (global indices)")
    ob, ib = tuple(dn.operand_batching_dims), tuple(dn.start_indices_batching_dims)
    if ai in ib:  # per-example rows of a (batched or batch-shaped) operand
        a = ob[ib.index(ai)]
        if ao not in (None, a):
            raise Unstreamable("gather indexes into the batch of its operand")
    elif ao is not None:
        raise Unstreamable("gather indexes into the batch of its operand")
    else:
        a = None  # rows of a global table (an embedding lookup)
    n_out = len(_shape(e.outvars[0]))
    batch_dims = [d for d in range(n_out) if d not in dn.offset_dims]
    return [a, ai], [batch_dims[ai]], None


def _scatter(add: bool):
    def rule(e, in_axes, n):
        dn = e.params["dimension_numbers"]
        ao, ai, au = in_axes[:3]
        n_idx = len(_shape(e.invars[1]))
        upd_scatter = [d for d in range(len(_shape(e.invars[2])))
                       if d not in dn.update_window_dims]
        if ai is None or ai == n_idx - 1 or au not in (None, upd_scatter[ai]):
            raise Unstreamable(f"{e.primitive} writes across the batch")
        ob, ib = tuple(dn.operand_batching_dims), tuple(dn.scatter_indices_batching_dims)
        if ai in ib:  # per-example rows of a batched operand
            a = ob[ib.index(ai)]
            if ao not in (None, a):
                raise Unstreamable(f"{e.primitive} operand batched along another axis")
            return [a, ai, upd_scatter[ai]], [a], None
        if ao is not None or not add:
            raise Unstreamable(f"{e.primitive} into a global operand is not a sum")
        return [None, ai, upd_scatter[ai]], [None], "scatter"  # e.g. embedding gradient
    return rule


def _window(e, in_axes, n):
    a = _common_axis(e, in_axes)
    p = e.params
    if p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1 or \
            tuple(p["padding"][a]) != (0, 0):
        raise Unstreamable(f"{e.primitive} windows over the batch axis")
    return _aligned(e, in_axes, a, n), [a] * len(e.outvars), None


def _multi_identity(e, in_axes, n):  # optimization_barrier and the like: output i = operand i
    return list(in_axes), list(in_axes), None


ELEMENTWISE = frozenset("""abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt
    ceil clamp conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc
    exp exp2 expm1 floor ge gt igamma imag integer_pow is_finite le lgamma log log1p logistic
    lt max min mul ne neg nextafter not or pow real reduce_precision rem round rsqrt select_n
    shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
    stop_gradient sub tan tanh xor population_count name""".split())

RULES = {
    **{p: _elementwise for p in ELEMENTWISE},
    "reduce_sum": _reduce("sum"), "reduce_max": _reduce("max"), "reduce_min": _reduce("min"),
    "reduce_prod": _reduce(None), "reduce_and": _reduce(None), "reduce_or": _reduce(None),
    "argmax": _reduce(None), "argmin": _reduce(None),
    "cumsum": _axis_param("axis"), "cumprod": _axis_param("axis"),
    "cummax": _axis_param("axis"), "cummin": _axis_param("axis"),
    "cumlogsumexp": _axis_param("axis"), "sort": _axis_param("dimension"),
    "concatenate": _axis_param("dimension"), "split": _axis_param("axis"),
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "squeeze": _squeeze,
    "transpose": _transpose,
    "rev": _untouched("dimensions", lambda dims, a, n: a not in dims),
    "pad": _untouched("padding_config", lambda cfg, a, n: tuple(cfg[a]) == (0, 0, 0)),
    "slice": _slice,
    "dynamic_slice": _untouched("slice_sizes", lambda s, a, n: s[a] == n),
    "dot_general": _dot_general, "conv_general_dilated": _conv, "gather": _gather,
    "scatter-add": _scatter(True), "scatter_add": _scatter(True), "scatter": _scatter(False),
    "reduce_window_sum": _window, "reduce_window_max": _window,
    "reduce_window_min": _window, "select_and_scatter_add": _window,
    "optimization_barrier": _multi_identity,
}


def _rebuildable(e, ax) -> bool:
    """A broadcast whose batch-sized axis ``ax`` comes from nothing batch-sized (zeros,
    a scalar, a size-1 axis): rebuilt at micro-batch size instead of sliced."""
    if e.primitive.name != "broadcast_in_dim":
        return False
    bd = tuple(e.params["broadcast_dimensions"])
    return ax not in bd or _shape(e.invars[0])[bd.index(ax)] == 1


def _micro_params(e, axes_in, axes_out, m) -> dict:
    """Params of a batched equation re-run at micro-batch size ``m`` (shape params only)."""
    name = e.primitive.name
    b = axes_out[0] if axes_out else None
    if name == "broadcast_in_dim":
        shape = list(e.params["shape"])
        shape[b] = m
        return {"shape": tuple(shape)}
    if name == "reshape":
        sizes = list(e.params["new_sizes"])
        sizes[b] = m
        return {"new_sizes": tuple(sizes)}
    if name == "slice":
        lim = list(e.params["limit_indices"])
        lim[b] = m
        return {"limit_indices": tuple(lim)}
    if name == "dynamic_slice":
        sizes = list(e.params["slice_sizes"])
        sizes[b] = m
        return {"slice_sizes": tuple(sizes)}
    if name == "iota":
        shape = list(e.params["shape"])
        shape[b] = m
        return {"shape": tuple(shape)}
    return {}


# ------------------------------------------------------------------ analysis

@dataclasses.dataclass
class Analysis:
    eqns: list                  # the program's equations, calls inlined
    outvars: list
    n: int                      # batch size
    batched_in: list            # per invar: batch axis or None
    axis: dict                  # var -> batch axis of every batched var
    how: dict                   # eqn index -> (operand_axes, out_axes, reduction)
    loop_of: dict               # reduction eqn index -> loop (1-based)
    out_loop: dict              # index of a batched outvar -> loop that emits it
    n_loops: int
    cone: dict                  # loop -> batched equations it recomputes, in order

    @property
    def reductions(self) -> int:
        return len(self.loop_of)

    def recomputed_flops(self) -> float:
        """FLOPs run more than once: every loop recomputes its cone (all micro-batches
        together are one full-batch pass), against one pass in the original."""
        flops = {i: analysis.eqn_cost(self.eqns[i]).flops for c in self.cone.values() for i in c}
        return float(sum(flops[i] for c in self.cone.values() for i in c) - sum(flops.values()))


def _flatten(jaxpr) -> tuple[list, list]:
    """Equations with pure call-like equations (jit, custom_jvp_call) inlined."""
    sub: dict = {}
    out = []

    def walk(eqns):
        for e in eqns:
            e = e.replace(invars=[sub.get(a, a) if ir.is_var(a) else a for a in e.invars])
            inner = next((j for _, _, j in ir.subjaxpr_params(e)), None)
            if (e.primitive.name in _CALLS and not ir.effectful(e) and inner is not None
                    and not ir.as_closed(inner).consts):
                new, outs = ir.copy_eqns(ir.as_closed(inner).jaxpr, e.invars)
                walk(new)
                for v, o in zip(e.outvars, outs):
                    if not ir.is_dropvar(v):
                        sub[v] = sub.get(o, o) if ir.is_var(o) else o
            else:
                out.append(e)
    walk(jaxpr.eqns)
    return out, [sub.get(v, v) if ir.is_var(v) else v for v in jaxpr.outvars]


def batch_inputs(jaxpr) -> tuple[int, list]:
    """(batch size, per invar: 0 when batched along its leading axis, else None):
    the trailing run of invars whose leading dimension has the last invar's size."""
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars]
    if not shapes or not shapes[-1]:
        raise Unstreamable("the last argument has no batch axis (scalar or no arguments)")
    n = shapes[-1][0]
    axes = [None] * len(shapes)
    for i in range(len(shapes) - 1, -1, -1):
        if not shapes[i] or shapes[i][0] != n:
            break
        axes[i] = 0
    if n < 2:
        raise Unstreamable(f"batch of size {n}")
    return n, axes


def analyse(cj: ir.ClosedJaxpr) -> Analysis:
    """Classify every equation as global, batched or a reduction over the batch, and
    give each reduction its loop. Raises :class:`Unstreamable` naming the obstacle."""
    jaxpr = cj.jaxpr
    n, batched_in = batch_inputs(jaxpr)
    eqns, outvars = _flatten(jaxpr)
    axis = {v: a for v, a in zip(jaxpr.invars, batched_in) if a is not None}
    glevel: dict = {}   # global var -> loops it waits for
    blevel = dict.fromkeys(axis, 0)   # batched var -> loops its inputs wait for
    how, loop_of = {}, {}

    def lvl(a):
        if not ir.is_var(a):
            return 0
        return blevel[a] if a in axis else glevel.get(a, 0)
    for i, e in enumerate(eqns):
        in_axes = [axis.get(a) if ir.is_var(a) else None for a in e.invars]
        need = max((lvl(a) for a in e.invars), default=0)
        if all(a is None for a in in_axes):
            for v in e.outvars:
                glevel[v] = need
            continue
        if ir.effectful(e) or e.primitive.name in ir.RANDOM_PRIMITIVES:
            raise Unstreamable(f"{e.primitive} (effectful or random) reads a batched value")
        rule = RULES.get(e.primitive.name)
        if rule is None:
            raise Unstreamable(f"no batch rule for {e.primitive}, which reads a batched value")
        op_axes, out_axes, red = rule(e, in_axes, n)
        for x, ax in zip(e.invars, op_axes):
            if ax is not None and _shape(x)[ax] != n:
                raise Unstreamable(f"{e.primitive}: operand axis {ax} is not the batch")
        how[i] = (op_axes, out_axes, red)
        if red is not None:
            loop_of[i] = need + 1
            for v in e.outvars:
                glevel[v] = need + 1
        else:
            for v, ax in zip(e.outvars, out_axes):
                if ax is None:
                    raise Unstreamable(f"{e.primitive} drops the batch axis")
                axis[v] = ax
                blevel[v] = need
    out_loop = {j: lvl(v) + 1 for j, v in enumerate(outvars) if ir.is_var(v) and v in axis}
    n_loops = max([*loop_of.values(), *out_loop.values(), 0])
    if not loop_of:
        raise Unstreamable("nothing reduces over the batch")
    return Analysis(eqns, outvars, n, batched_in, axis, how, loop_of, out_loop, n_loops,
                    _cones(eqns, outvars, axis, loop_of, out_loop, n_loops))


def _cones(eqns, outvars, axis, loop_of, out_loop, n_loops) -> dict:
    """Per loop, the batched equations its reductions and batched outputs read."""
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    cone = {}
    for j in range(1, n_loops + 1):
        todo = [v for i, lp in loop_of.items() if lp == j for v in eqns[i].invars]
        todo += [outvars[o] for o, lp in out_loop.items() if lp == j]
        seen = set()
        while todo:
            v = todo.pop()
            i = producer.get(v) if ir.is_var(v) and v in axis else None
            if i is None or i in seen:
                continue
            seen.add(i)
            todo.extend(eqns[i].invars)
        cone[j] = sorted(seen)
    return cone


# ------------------------------------------------------------------ rewrite

def _combine(kind, acc, part):
    if kind in ("sum", "scatter"):
        return acc + part
    return jnp.maximum(acc, part) if kind == "max" else jnp.minimum(acc, part)


def _init(kind, aval):
    if kind in ("sum", "scatter"):
        return jnp.zeros(aval.shape, aval.dtype)
    big = jnp.inf if jnp.issubdtype(aval.dtype, jnp.floating) else jnp.iinfo(aval.dtype).max
    return jnp.full(aval.shape, -big if kind == "max" else big, aval.dtype)


def stream(cj: ir.ClosedJaxpr, k: int, an: Analysis | None = None) -> ir.ClosedJaxpr:
    """``cj`` run over ``k`` micro-batches (``k`` divides the batch)."""
    an = an or analyse(cj)
    if an.n % k:
        raise ValueError(f"remat: {k} micro-batches do not divide the batch of {an.n}")
    m = an.n // k
    eqns, jaxpr = an.eqns, cj.jaxpr
    producer = {v: i for i, e in enumerate(eqns) for v in e.outvars}

    def run(*args):
        env = dict(zip(jaxpr.constvars, cj.consts))
        env.update(zip(jaxpr.invars, args))

        def read(a):
            return ir.literal_value(a) if ir.is_literal(a) else env[a]
        done_global = set()

        def run_globals():  # every global equation whose inputs exist by now, in order
            for i, e in enumerate(eqns):
                if i in an.how or i in done_global:
                    continue
                if all(not ir.is_var(a) or a in env for a in e.invars):
                    done_global.add(i)
                    for v, x in zip(e.outvars, ir.bind_eqn(e, [read(a) for a in e.invars])):
                        env[v] = x
        xs_in = [(v, a.reshape((k, m) + a.shape[1:])) for v, a, ax in
                 zip(jaxpr.invars, args, an.batched_in) if ax is not None]
        for j in range(1, an.n_loops + 1):
            run_globals()
            reds = [i for i, lp in an.loop_of.items() if lp == j]
            outs = [o for o, lp in an.out_loop.items() if lp == j]
            init = [_init(an.how[i][2], v.aval) for i in reds for v in eqns[i].outvars]

            def body(acc, xs, reds=reds, outs=outs, j=j):
                idx, slices = xs[0], xs[1:]
                benv = dict(zip([v for v, _ in xs_in], slices))
                memo: dict = {}

                def micro_global(v, ax):
                    """A global with a batch-sized axis, at micro-batch size: rebuilt
                    when it is a broadcast (zeros, a scalar), else sliced."""
                    if ir.is_literal(v):
                        return ir.literal_value(v)
                    key = (v, ax)
                    if key not in memo:
                        i = producer.get(v)
                        e = eqns[i] if i is not None else None
                        if e is not None and _rebuildable(e, ax):
                            memo[key] = ir.bind_eqn(e, [read(a) for a in e.invars],
                                                    **_micro_params(e, [], [ax], m))[0]
                        else:
                            memo[key] = lax.dynamic_slice_in_dim(env[v], idx * m, m, axis=ax)
                    return memo[key]

                def operand(a, ax):
                    if ax is None or not ir.is_var(a):
                        return read(a)
                    return benv[a] if a in an.axis else micro_global(a, ax)

                def run_eqn(i):
                    e = eqns[i]
                    op_axes, out_axes, red = an.how[i]
                    vals = [operand(a, ax) for a, ax in zip(e.invars, op_axes)]
                    if red == "scatter":  # sum onto zeros; the operand is added once
                        vals[0] = jnp.zeros_like(vals[0])
                    upd = _micro_params(e, op_axes, out_axes, m) if red is None else {}
                    return ir.bind_eqn(e, vals, **upd)
                for i in an.cone[j]:
                    benv.update(zip(eqns[i].outvars, run_eqn(i)))
                parts = [p for i in reds for p in run_eqn(i)]
                kinds = [an.how[i][2] for i in reds for _ in eqns[i].outvars]
                acc = [_combine(kd, a, p) for kd, a, p in zip(kinds, acc, parts)]
                return acc, [benv[an.outvars[o]] for o in outs]
            with jax.named_scope(f"remat/stream{j}"):
                acc, ys = lax.scan(body, init, [jnp.arange(k)] + [x for _, x in xs_in])
            flat = [(i, v) for i in reds for v in eqns[i].outvars]
            for (i, v), a in zip(flat, acc):
                if an.how[i][2] == "scatter":
                    a = a + read(eqns[i].invars[0])
                env[v] = a.astype(v.aval.dtype)
            for o, y in zip(outs, ys):
                b = an.axis[an.outvars[o]]
                y = jnp.moveaxis(y, 0, b)  # [.., k, m, ..] -> the batch axis of n rows
                env[an.outvars[o]] = y.reshape(an.outvars[o].aval.shape)
        run_globals()
        return [read(v) for v in an.outvars]

    new = ir.trace_flat(run, [v.aval for v in jaxpr.invars])
    return ir.closed(ir.dce_same_interface(new.jaxpr), new.consts)


def micro_batch_counts(n: int) -> list[int]:
    """Numbers of micro-batches to try, fewest first: the divisors of ``n`` above 1."""
    return [k for k in range(2, n + 1) if n % k == 0]


__all__ = ["Unstreamable", "Analysis", "RULES", "analyse", "batch_inputs", "stream",
           "micro_batch_counts"]
