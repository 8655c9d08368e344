"""The fence: a recomputation XLA can neither fold nor merge with the forward copy.

XLA CPU drops ``optimization_barrier`` after compilation and its CSE merges a
recomputation with the forward value it was meant to replace. A recomputation run
inside a ``lax.cond`` whose two branches are the same recomputation and whose predicate
comes from a backward value (``g[0] == g[0]``) survives: XLA cannot fold it, it happens
after the cotangent exists, and results are identical whatever the predicate. Used by
the post-AD rewrite (:mod:`.rewrite`) and pre-AD segments (:mod:`.pre_ad`).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from graphopt import ir


def fence_pred(gs):
    """A predicate XLA cannot fold, true unless the cotangent is NaN."""
    s = sum(g.reshape(-1)[0].astype(jnp.float32) for g in gs)
    return s == s


def fenced(fn, gs, *xs):
    """``fn(*xs)`` inside ``lax.cond(g[0] == g[0], fn, fn, ...)``: survives XLA's CSE."""
    gs = [g for g in gs if jnp.issubdtype(g.dtype, jnp.floating) and g.size > 0]
    if not gs:  # nothing to key on: an optimization barrier is all we can do
        return fn(*lax.optimization_barrier(xs))
    return lax.cond(fence_pred(gs), fn, fn, *xs)


def float_var(v) -> bool:
    """A floating-point array variable holding at least one element."""
    a = getattr(v, "aval", None)
    return (ir.is_var(v) and ir.is_array_aval(a) and jnp.issubdtype(a.dtype, jnp.floating)
            and ir.aval_nbytes(a) > 0)


def pin(m, x):
    """``m`` through a cond XLA cannot fold, keyed on the comparison operand ``x``: the
    branch taken when ``x[0]`` is not NaN ands the mask with that very fact (identical
    branches would be forwarded away by ``lax.cond``)."""
    p = fence_pred([x])
    return lax.cond(p, lambda m, p: m & p, lambda m, p: m, m, p)


def materialize(x):
    """``x`` computed once, through a cond XLA cannot fold keyed on ``x`` itself, so every
    reader shares one copy rather than recomputing it in its own fusion (``x * 1`` keeps
    the branches apart for ``lax.cond`` and is exact, NaN and -0 included)."""
    return lax.cond(fence_pred([x]), lambda x: x * jnp.ones((), x.dtype), lambda x: x, x)


__all__ = ["fenced", "pin", "materialize", "float_var"]
