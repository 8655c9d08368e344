"""The per-primitive rule table of micro-batch streaming (:mod:`.batch`).

A rule says, for one equation that reads a batched value, along which axis each operand
is read per micro-batch and what each output is: batched along an axis, or a sum / max /
min over the batch (combined across micro-batches), or "same" (independent of the
batch). A primitive without a rule stops the rewrite (:class:`Unstreamable` names it).
Every rule is an exact split of the computation. ``scan`` is ruled in
:mod:`.batch` (its body is classified like the program).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from graphopt import ir, primitives


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

def shape_of(a):
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
        s = shape_of(x)
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
    b = _reshape_axis(shape_of(e.invars[0]), a, shape_of(e.outvars[0]))
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
    nl, nr = len(shape_of(e.invars[0])), len(shape_of(e.invars[1]))
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
    n_idx = len(shape_of(e.invars[1]))
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
    n_out = len(shape_of(e.outvars[0]))
    batch_dims = [d for d in range(n_out) if d not in dn.offset_dims]
    return [a, ai], [batch_dims[ai]]


def _scatter(add: bool):
    def rule(e, in_axes, n):
        dn = e.params["dimension_numbers"]
        ao, ai, au = in_axes[:3]
        n_idx = len(shape_of(e.invars[1]))
        upd_scatter = [d for d in range(len(shape_of(e.invars[2])))
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


def _multi_identity(e, in_axes, n):  # optimization_barrier and the like: output i = operand i
    if any(a is None for a in in_axes):
        raise Unstreamable(f"{e.primitive} holds batched and global values together")
    return list(in_axes), list(in_axes)


ELEMENTWISE = primitives.ELEMENTWISE

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

# ops through which a per-iteration sum over the batch stays a sum (inside scan bodies):
# the first operand is the sum, the others are global (or, for add/sub, sums too)
LINEAR = frozenset({"neg", "reshape", "transpose", "broadcast_in_dim", "convert_element_type",
                     "reduce_sum", "squeeze", "copy", "copy_p", "mul", "div", "dot_general",
                     "slice", "dynamic_slice", "rev"})
ADDITIVE = frozenset({"add", "add_any", "sub"})


def rebuildable(e, ax) -> bool:
    """A broadcast whose batch-sized axis ``ax`` comes from nothing batch-sized (zeros,
    a scalar, a size-1 axis): rebuilt at micro-batch size instead of sliced."""
    if e.primitive.name != "broadcast_in_dim":
        return False
    bd = tuple(e.params["broadcast_dimensions"])
    return ax not in bd or shape_of(e.invars[0])[bd.index(ax)] == 1


# the param holding each primitive's output extent along the batch axis (default: none)
SHAPE_PARAM = {"broadcast_in_dim": "shape", "reshape": "new_sizes", "slice": "limit_indices",
                "dynamic_slice": "slice_sizes"}


def micro_params(e, axes_out, m) -> dict:
    """Params of a batched equation re-run at micro-batch size ``m`` (shape params only)."""
    key = SHAPE_PARAM.get(e.primitive.name)
    if key is None or not axes_out or not isinstance(axes_out[0], int):
        return {}
    sizes = list(e.params[key])
    sizes[axes_out[0]] = m
    return {key: tuple(sizes)}


# ------------------------------------------------------------------ checks and combining

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
            raise Unstreamable(f"the last argument (argument {last} of the call, taken as "
                               "the batch) has leaves that do not share a leading (batch) "
                               f"axis: shapes {[shapes[i] for i in mine]}")
        n = sizes.pop()
        axes = [0 if i in mine else None for i in range(len(shapes))]
    else:
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


def batch_source(positions, batched_in, names=None) -> str:
    """Which argument :func:`batch_inputs` took as the batch, for the report: by its place
    in the call (``names``: per place, its name; ``arg<i>`` is positional ``i``), or by
    flat input when the call is not known."""
    mine = [i for i, a in enumerate(batched_in) if a is not None]
    if positions is None or not any(p is not None for p in positions):
        return (f"flat inputs {mine[0]}..{mine[-1]} (the trailing inputs sharing the last "
                "one's leading size)")
    last = max(p for p in positions if p is not None)
    name = names[last] if names is not None and last < len(names) else None
    if name is None or (name.startswith("arg") and name[3:].isdigit()):
        arg = f"argument {last if name is None else int(name[3:])}"
    else:
        arg = f"argument {name!r}"
    earlier = sum(1 for p in set(positions) if p is not None and p != last)
    return (f"{arg}, the last array argument of the call: {len(mine)} leaves split along "
            "their leading axis" + (f"; the {earlier} argument(s) before it are not split, so "
                                    "a batch passed earlier must come last" if earlier else ""))


def check_accumulator(eqns, outvars, nk, v_in, v_out, partial) -> list:
    """A carry that sums over the batch must be ``c_out = c_in + (a sum)`` and nothing
    else may read ``c_in`` or ``c_out`` (a decayed, overwritten or negated carry would
    lose or repeat its initial value across micro-batches). Returns the indices of the
    ys that emit ``c_in`` or ``c_out`` as they are: the initial value is added to them
    after the loop, as to the final carry."""
    readers = [e for e in eqns if v_in in e.invars or v_out in e.invars]
    made = next((e for e in eqns if v_out in e.outvars), None)
    carries = [v for v in outvars[:nk] if ir.is_var(v)]
    ok = (made is not None and readers == [made] and made.primitive.name in ("add", "add_any")
          and sum(a is v_in for a in made.invars) == 1
          and all(a is v_in or (ir.is_var(a) and a in partial) for a in made.invars)
          and sum(v is v_out for v in carries) == 1 and not any(v is v_in for v in carries))
    if not ok:
        raise Unstreamable("scan carry mixes its initial value with a sum over the batch "
                           "other than by adding to it")
    return [y for y, v in enumerate(outvars[nk:]) if v is v_in or v is v_out]


def check_linear(e, partial, in_axes) -> list:
    """Raise unless ``e`` keeps a per-iteration sum over the batch a sum; returns the
    global operands an addition adds to it (fine only if they are sums too: a scan's
    accumulating carry, which the scan rule then marks)."""
    parts = [ir.is_var(a) and a in partial for a in e.invars]
    name = e.primitive.name
    if not any(a is not None for a in in_axes):
        if name in ADDITIVE and all(p or ir.is_var(a) for p, a in zip(parts, e.invars)):
            return [a for p, a in zip(parts, e.invars) if not p]
        if name == "convert_element_type" and not all(
                jnp.issubdtype(x.aval.dtype, jnp.floating) for x in (e.invars[0], e.outvars[0])):
            pass  # a sum of integer conversions is not the conversion of the sum
        elif name in ("mul", "div", "dot_general") and not jnp.issubdtype(
                e.outvars[0].aval.dtype, jnp.floating):
            pass  # integer division (and wrapping products) do not split over sums
        elif name in LINEAR and sum(parts) == 1 and (parts[0] or name in ("mul", "dot_general")):
            return []
    raise Unstreamable(f"{e.primitive} of a per-iteration sum over the batch is not linear")


def combine(kind, acc, part):
    """Two micro-batches' values of a "sum"/"max"/"min"/"same" output as one."""
    if kind == "sum":
        return acc + part
    if kind == "same":
        return part
    return jnp.maximum(acc, part) if kind == "max" else jnp.minimum(acc, part)


def identity(kind, aval):
    """What a loop's accumulator starts from: the identity of ``kind`` in its own dtype
    (-iinfo.max wraps for unsigned ints and misses iinfo.min; iinfo rejects bool)."""
    dt = aval.dtype
    if kind in ("sum", "same"):
        return jnp.zeros(aval.shape, dt)
    lowest = kind == "max"
    if jnp.issubdtype(dt, jnp.bool_):
        value = not lowest
    elif jnp.issubdtype(dt, jnp.floating):
        value = -jnp.inf if lowest else jnp.inf
        if not np.isinf(np.array(value, dt)):  # float8 e4m3fn has no inf
            value = jnp.finfo(dt).min if lowest else jnp.finfo(dt).max
    else:
        value = jnp.iinfo(dt).min if lowest else jnp.iinfo(dt).max
    return jnp.full(aval.shape, value, dt)
