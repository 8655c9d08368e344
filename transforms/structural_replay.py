"""Run the traced jaxpr of ``apply`` at the pruned shapes (for models that check shapes).

Some models cannot be re-run on smaller params (flax linen compares each kernel with the
module's ``features``). The jaxpr traced for the groups already knows, for every value,
which axes shrink: equations are re-bound with their shape parameters (``reshape``,
``broadcast_in_dim``, ``split``) set to the new sizes; call-like equations (``jit``,
``custom_jvp_call``, ...) are replayed equation by equation, so their custom
derivative rules are not kept (the jvp of their body is used instead).
"""
from __future__ import annotations

import jax

from graphopt import ir


def _new_len(atoms, a, kept):
    if any(atoms.find(g) in kept for g in atoms.groups_under(a)):
        return len(atoms.index(a, kept))
    return atoms.size[atoms.find(a)]


def _shape(analysis, ctx, v, kept):
    return tuple(_new_len(analysis.atoms, a, kept) for a in analysis.walk.axes[(ctx, id(v))])


def _updates(analysis, ctx, eqn, kept):
    name = ir.prim_name(eqn)
    if name == "reshape":
        return {"new_sizes": _shape(analysis, ctx, eqn.outvars[0], kept)}
    if name == "broadcast_in_dim":
        return {"shape": _shape(analysis, ctx, eqn.outvars[0], kept)}
    if name == "split":
        axis = eqn.params["axis"]
        return {"sizes": tuple(_shape(analysis, ctx, v, kept)[axis] for v in eqn.outvars)}
    return {}


def _run(analysis, jaxpr, consts, args, ctx, kept):
    env = {}

    def read(v):
        return ir.literal_value(v) if ir.is_literal(v) else env[id(v)]

    for v, x in zip(jaxpr.constvars, consts):
        env[id(v)] = x
    for v, x in zip(jaxpr.invars, args):
        env[id(v)] = x
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        inner_ctx = analysis.walk.calls.get((ctx, id(eqn)))
        if inner_ctx is not None:
            (_, _, sub), = ir.subjaxpr_params(eqn)
            inner = getattr(sub, "jaxpr", sub)
            outs = _run(analysis, inner, getattr(sub, "consts", ()), vals, inner_ctx, kept)
        else:
            outs = ir.bind_eqn(eqn, vals, **_updates(analysis, ctx, eqn, kept))
        for v, x in zip(eqn.outvars, outs):
            if not ir.is_dropvar(v):
                env[id(v)] = x
    return [read(v) for v in jaxpr.outvars]


def replayed(analysis, kept, out_tree):
    """``f(params, x)`` evaluating the traced jaxpr at the pruned shapes."""
    cj = analysis.jaxpr

    def f(params, x):
        flat = jax.tree_util.tree_leaves((params, x))
        return jax.tree_util.tree_unflatten(out_tree, _run(analysis, cj.jaxpr, cj.consts, flat, 0, kept))

    return f
