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
original up to the order of float additions.
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
# rule(eqn, in_axes, n) -> (operand_axes, outs[, base[, body]]):
#   in_axes[i]: batch axis of operand i, or None when it is global;
#   operand_axes[i]: the axis along which operand i is read per micro-batch (None:
#     whole; a global with an axis is sliced or rebuilt at micro-batch size);
#   outs[k]: batch axis of output k, or how its per-micro-batch values combine into the
#     full-batch global ("sum", "max", "min"; "same": it does not depend on the batch);
#   base: {output: operand} whose operand is zeros in micro-batch runs and is added
#     once after the loop (a scatter-add's operand, a scan's accumulating carry).

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
    return _aligned(e, in_axes, a, n), [a] * len(e.outvars)


def _reduce(kind):
    def rule(e, in_axes, n):
        (a,) = in_axes
        axes = tuple(e.params["axes"])
        if a in axes:
            if kind is None:
                raise Unstreamable(f"{e.primitive} over the batch axis has no partial form")
            return [a], [kind]
        return [a], [a - sum(x < a for x in axes)]
    return rule


def _axis_param(name):
    def rule(e, in_axes, n):
        a = _common_axis(e, in_axes)
        if e.params[name] == a:
            raise Unstreamable(f"{e.primitive} runs along the batch axis")
        return _aligned(e, in_axes, a, n), [a] * len(e.outvars)
    return rule


def _broadcast_in_dim(e, in_axes, n):
    a = in_axes[0]
    return [a] + [None] * (len(e.invars) - 1), [e.params["broadcast_dimensions"][a]]


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
    return [a] + [None] * (len(e.invars) - 1), [b]


def _squeeze(e, in_axes, n):
    a = in_axes[0]
    dims = tuple(e.params["dimensions"])
    return [a], [a - sum(d < a for d in dims)]


def _transpose(e, in_axes, n):
    a = in_axes[0]
    return [a], [tuple(e.params["permutation"]).index(a)]


def _untouched(param, what):
    """Ops whose ``param`` lists per-axis settings that must leave the batch axis alone."""
    def rule(e, in_axes, n):
        a = _common_axis(e, in_axes)
        if not what(e.params[param], a, n):
            raise Unstreamable(f"{e.primitive} changes the batch axis ({param})")
        return _aligned(e, in_axes, a, n), [a] * len(e.outvars)
    return rule


def _slice(e, in_axes, n):
    (a,) = in_axes
    p = e.params
    if p["start_indices"][a] != 0 or p["limit_indices"][a] != n or \
            (p["strides"] and p["strides"][a] != 1):
        raise Unstreamable("slice cuts the batch axis")
    return [a], [a]


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
            return [al, rc[j]], ["sum"]
        if al in lb:
            j = lb.index(al)
            if ar not in (None, rb[j]):
                raise Unstreamable("dot_general pairs the batch with another axis")
            return [al, rb[j]], [j]
        if ar is not None:
            raise Unstreamable("dot_general multiplies two batches (outer product)")
        return [al, None], [len(lb) + lfree.index(al)]
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    if ar in rc:
        return [lc[rc.index(ar)], ar], ["sum"]
    if ar in rb:
        j = rb.index(ar)
        return [lb[j], ar], [j]
    return [None, ar], [len(lb) + len(lfree) + rfree.index(ar)]


def _conv(e, in_axes, n):
    lhs_spec, rhs_spec, out_spec = e.params["dimension_numbers"]
    al, ar = in_axes
    plain = e.params["feature_group_count"] == 1 and e.params["batch_group_count"] == 1
    if al == lhs_spec[0] and ar is None and e.params["batch_group_count"] == 1:
        return [al, None], [out_spec[0]]  # forward or input gradient
    if plain and al == lhs_spec[1] and ar == rhs_spec[1]:
        return [al, ar], ["sum"]  # weight gradient: contracts the batch
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
    return [a, ai], [batch_dims[ai]]


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
            return [a, ai, upd_scatter[ai]], [a]
        if ao is not None or not add:
            raise Unstreamable(f"{e.primitive} into a global operand is not a sum")
        return [None, ai, upd_scatter[ai]], ["sum"], {0: 0}  # e.g. embedding gradient
    return rule


def _window(e, in_axes, n):
    a = _common_axis(e, in_axes)
    p = e.params
    if p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1 or \
            tuple(p["padding"][a]) != (0, 0):
        raise Unstreamable(f"{e.primitive} windows over the batch axis")
    return _aligned(e, in_axes, a, n), [a] * len(e.outvars)


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
    for c in acc:  # each micro-batch starts it at zero and the init is added once after:
        _check_accumulator(eqns, outvars, invars[nc + c], outvars[c], partial)  # c += sum
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
    base = {c: nc + c for c in acc}
    return op_axes, outs, base, Body(eqns, outvars, how, axis, list(invars),
                                      list(body.jaxpr.constvars), list(body.consts))


def _check_accumulator(eqns, outvars, v_in, v_out, partial):
    """A carry that sums over the batch must be ``c_out = c_in + (a sum)`` and nothing
    else may read ``c_in`` or ``c_out`` (a decayed, overwritten or emitted carry would
    lose or repeat its initial value across micro-batches)."""
    readers = [e for e in eqns if v_in in e.invars or v_out in e.invars]
    made = next((e for e in eqns if v_out in e.outvars), None)
    ok = (made is not None and readers == [made] and made.primitive.name in ("add", "add_any")
          and sum(a is v_in for a in made.invars) == 1
          and all(a is v_in or (ir.is_var(a) and a in partial) for a in made.invars)
          and sum(ir.is_var(v) and v is v_out for v in outvars) == 1)
    if not ok:
        raise Unstreamable("scan carry mixes its initial value with a sum over the batch "
                           "other than by adding to it")


def _multi_identity(e, in_axes, n):  # optimization_barrier and the like: output i = operand i
    if any(a is None for a in in_axes):
        raise Unstreamable(f"{e.primitive} holds batched and global values together")
    return list(in_axes), list(in_axes)


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
    "optimization_barrier": _multi_identity, "scan": _scan,
}

# ops through which a per-iteration sum over the batch stays a sum (inside scan bodies):
# the first operand is the sum, the others are global (or, for add/sub, sums too)
_LINEAR = frozenset({"neg", "reshape", "transpose", "broadcast_in_dim", "convert_element_type",
                     "reduce_sum", "squeeze", "copy", "copy_p", "mul", "div", "dot_general",
                     "slice", "dynamic_slice", "rev"})
_ADDITIVE = frozenset({"add", "add_any", "sub"})


def _rebuildable(e, ax) -> bool:
    """A broadcast whose batch-sized axis ``ax`` comes from nothing batch-sized (zeros,
    a scalar, a size-1 axis): rebuilt at micro-batch size instead of sliced."""
    if e.primitive.name != "broadcast_in_dim":
        return False
    bd = tuple(e.params["broadcast_dimensions"])
    return ax not in bd or _shape(e.invars[0])[bd.index(ax)] == 1


# the param holding each primitive's output extent along the batch axis (default: none)
_SHAPE_PARAM = {"broadcast_in_dim": "shape", "reshape": "new_sizes", "slice": "limit_indices",
                "dynamic_slice": "slice_sizes"}


def _micro_params(e, axes_out, m) -> dict:
    """Params of a batched equation re-run at micro-batch size ``m`` (shape params only)."""
    key = _SHAPE_PARAM.get(e.primitive.name)
    if key is None or not axes_out or not isinstance(axes_out[0], int):
        return {}
    sizes = list(e.params[key])
    sizes[axes_out[0]] = m
    return {key: tuple(sizes)}


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
            wants.update(_check_linear(e, partial, in_axes))
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
            if ax is not None and _shape(x)[ax] != n:
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


def _check_linear(e, partial, in_axes) -> list:
    """Raise unless ``e`` keeps a per-iteration sum over the batch a sum; returns the
    global operands an addition adds to it (fine only if they are sums too: a scan's
    accumulating carry, which the scan rule then marks)."""
    parts = [ir.is_var(a) and a in partial for a in e.invars]
    name = e.primitive.name
    if not any(a is not None for a in in_axes):
        if name in _ADDITIVE and all(p or ir.is_var(a) for p, a in zip(parts, e.invars)):
            return [a for p, a in zip(parts, e.invars) if not p]
        if name == "convert_element_type" and not all(
                jnp.issubdtype(x.aval.dtype, jnp.floating) for x in (e.invars[0], e.outvars[0])):
            pass  # a sum of integer conversions is not the conversion of the sum
        elif name in ("mul", "div", "dot_general") and not jnp.issubdtype(
                e.outvars[0].aval.dtype, jnp.floating):
            pass  # integer division (and wrapping products) do not split over sums
        elif name in _LINEAR and sum(parts) == 1 and (parts[0] or name in ("mul", "dot_general")):
            return []
    raise Unstreamable(f"{e.primitive} of a per-iteration sum over the batch is not linear")


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


def batch_inputs(jaxpr, positions=None) -> tuple[int, list]:
    """(batch size, per invar: 0 when batched along its leading axis, else None).

    ``positions`` (per invar, its argument's place in the call, as ``graphopt.optimize``
    knows it): the leaves of the last argument, which must share a leading size.
    Without it: the trailing run of invars whose leading size is the last invar's."""
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars]
    if positions is not None and any(p is not None for p in positions):
        last = max(p for p in positions if p is not None)
        mine = [i for i, p in enumerate(positions) if p == last]
        sizes = {shapes[i][0] if shapes[i] else None for i in mine}
        if len(sizes) != 1 or None in sizes:
            raise Unstreamable("the last argument's leaves do not share a leading (batch) "
                               f"axis: shapes {[shapes[i] for i in mine]}")
        n = sizes.pop()
        if n < 2:
            raise Unstreamable(f"batch of size {n}")
        return n, [0 if i in mine else None for i in range(len(shapes))]
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
    return Analysis(eqns, outvars, n, batched_in, axis, how, loop_of, out_loop, n_loops,
                    _cones(eqns, outvars, {**axis, **same}, loop_of, out_loop, n_loops))


def _cones(eqns, outvars, axis, loop_of, out_loop, n_loops) -> dict:
    """Per loop, the batched equations its combining equations and batched outputs read."""
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
    if kind == "sum":
        return acc + part
    if kind == "same":
        return part
    return jnp.maximum(acc, part) if kind == "max" else jnp.minimum(acc, part)


def _init(kind, aval):
    if kind in ("sum", "same"):
        return jnp.zeros(aval.shape, aval.dtype)
    big = jnp.inf if jnp.issubdtype(aval.dtype, jnp.floating) else jnp.iinfo(aval.dtype).max
    return jnp.full(aval.shape, -big if kind == "max" else big, aval.dtype)


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

        def read(a):
            return ir.literal_value(a) if ir.is_literal(a) else env[a]

        def micro_global(v, ax):
            # a global with a batch-sized axis read per example: rebuilt when it is a
            # broadcast (zeros, a scalar), else sliced
            if (v, ax) not in memo:
                i = producer.get(v)
                if i is not None and _rebuildable(eqns[i], ax):
                    e = eqns[i]
                    memo[v, ax] = ir.bind_eqn(e, [read(a) for a in e.invars],
                                              **_micro_params(e, [ax], self.m))[0]
                else:
                    memo[v, ax] = lax.dynamic_slice_in_dim(env[v], self.idx * self.m,
                                                           self.m, axis=ax)
            return memo[v, ax]

        for i in order:
            e, h = eqns[i], how.get(i)
            if h is None:  # global (or a sum flowing through a linear op): as it is
                env.update(zip(e.outvars, ir.bind_eqn(e, [read(a) for a in e.invars])))
                continue
            vals = [read(a) if ax is None or not ir.is_var(a) else
                    env[a] if a in axis else micro_global(a, ax)
                    for a, ax in zip(e.invars, h.op_axes)]
            for j in set(h.base.values()):
                vals[j] = jnp.zeros_like(vals[j])
            if h.body is not None:
                outs = self.scan(e, h.body, vals)
            else:
                outs = ir.bind_eqn(e, vals, **_micro_params(e, h.outs, self.m))
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
            outs = [ir.literal_value(v) if ir.is_literal(v) else env[v] for v in body.outvars]
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
                    env.update(zip(e.outvars, ir.bind_eqn(
                        e, [ir.literal_value(a) if ir.is_literal(a) else env[a]
                            for a in e.invars])))
        xs_in = [(v, a.reshape((k, m) + a.shape[1:])) for v, a, ax in
                 zip(jaxpr.invars, args, an.batched_in) if ax is not None]
        for j in range(1, an.n_loops + 1):
            run_globals()
            reds = [i for i, lp in an.loop_of.items() if lp == j]
            comb = [(i, kd, v) for i in reds for kd, v in zip(an.how[i].outs, eqns[i].outvars)
                    if isinstance(kd, str)]
            outs = [o for o, lp in an.out_loop.items() if lp == j]

            def body(acc, xs, reds=reds, comb=comb, outs=outs, j=j):
                benv = dict(env)
                benv.update(zip([v for v, _ in xs_in], xs[1:]))
                order = sorted(set(an.cone[j]) | set(reds))
                parts: dict = {}
                _Micro(m, xs[0]).run(eqns, an.how, an.axis, benv, order, parts)
                acc = [_combine(kd, a, parts[v] if v in parts else benv[v])
                       for (_, kd, v), a in zip(comb, acc)]
                return acc, [benv[an.outvars[o]] for o in outs]
            init = [_init(kd, v.aval) for _, kd, v in comb]
            with jax.named_scope(f"remat/stream{j}"):
                acc, ys = lax.scan(body, init, [jnp.arange(k)] + [x for _, x in xs_in])
            for (i, kd, v), a in zip(comb, acc):
                base = an.how[i].base.get(eqns[i].outvars.index(v))
                if base is not None:
                    x = eqns[i].invars[base]
                    a = a + (ir.literal_value(x) if ir.is_literal(x) else env[x])
                env[v] = a.astype(v.aval.dtype)
            for o, y in zip(outs, ys):
                v = an.outvars[o]
                env[v] = jnp.moveaxis(y, 0, an.axis[v]).reshape(v.aval.shape)
        run_globals()
        return [ir.literal_value(v) if ir.is_literal(v) else env[v] for v in an.outvars]

    new = ir.trace_flat(run, [v.aval for v in jaxpr.invars])
    return ir.closed(ir.dce_same_interface(new.jaxpr), new.consts)


def micro_batch_counts(n: int) -> list[int]:
    """Numbers of micro-batches to try, fewest first: the divisors of ``n`` above 1."""
    return [k for k in range(2, n + 1) if n % k == 0]


__all__ = ["Unstreamable", "Analysis", "RULES", "analyse", "batch_inputs", "stream",
           "micro_batch_counts"]
