"""Normal forms of [rows, V] values for the cross-entropy matcher (:mod:`xent_match`).

``Aff``: ``a·z[sel] + b``; ``Exp``: ``exp(z[sel] + b)``; ``Row``: a per-row value
broadcast over the vocabulary; ``Lab``: ``α·one_hot(y) + β``; ``Prod``: ``Lab · Aff``.
Coefficients are functions of the replacement's runtime environment (:class:`Env`);
``None`` stands for 1 (``a``) or 0 (``b``). ``sel`` is the row slices/reshapes applied
since the projection, each a pair (forward on per-row values, inverse on labels).
"""
from __future__ import annotations

import dataclasses

import numpy as np

import jax.numpy as jnp
from jax import lax

from graphopt import ir


class Refuse(Exception):
    """A candidate the rule recognised and leaves unfused; the message says why."""


@dataclasses.dataclass
class Aff:
    a: object      # None (1) or fn(E)
    b: object      # None (0) or fn(E)
    sel: tuple


@dataclasses.dataclass
class Exp:
    b: object
    sel: tuple


@dataclasses.dataclass
class Row:
    f: object


@dataclasses.dataclass
class Lab:
    alpha: object
    beta: object
    y: object      # the label atom


@dataclasses.dataclass
class Prod:
    lab: Lab
    aff: Aff


def _combine(f, g, op):
    """fn(E) for ``op(f, g)``; None stands for the neutral element (handled by callers)."""
    return lambda E: op(f(E), g(E))


def _add(f, g):
    if f is None:
        return g
    if g is None:
        return f
    return _combine(f, g, jnp.add)


def _neg(f):
    return None if f is None else (lambda E: -f(E))


def _one(f):
    return (lambda E: 1) if f is None else f


def _scale(f, r, op=jnp.multiply):
    return _combine(_one(f), r, op) if f is not None or op is jnp.multiply else (lambda E: op(1, r(E)))


def _scale_b(f, r, op=jnp.multiply):
    return None if f is None else _combine(f, r, op)


def _apply_sel(x, sel):
    for op in sel:
        x = op[0](x)
    return x


def _slice_op(e):
    p = e.params
    st, lim = tuple(p["start_indices"]), tuple(p["limit_indices"])
    strd = tuple(p["strides"]) if p["strides"] is not None else (1,) * len(st)
    shape_in = tuple(e.invars[0].aval.shape)
    fwd = lambda x: lax.slice(x, st[:-1] + (0,), lim[:-1] + (x.shape[-1],), strd[:-1] + (1,))

    def inv(lab):  # labels at the sliced rows -> labels at the full rows (0 elsewhere)
        cfg = []
        for k, n in enumerate(lab.shape):
            used = st[k] + (n - 1) * strd[k] + 1 if n else st[k]
            cfg.append((st[k], shape_in[k] - used, strd[k] - 1))
        return lax.pad(lab, jnp.zeros((), lab.dtype), cfg)
    return (fwd, inv)


def _reshape_op(e):
    rows_out = tuple(e.outvars[0].aval.shape[:-1])
    rows_in = tuple(e.invars[0].aval.shape[:-1])
    return (lambda x: x.reshape(rows_out + (x.shape[-1],)), lambda lab: lab.reshape(rows_in))


def follow(view, a, prims, seen):
    while True:
        e = view.producer_eqn(a)
        if e is None or e.primitive.name not in prims:
            return a
        seen.add(view.producer[a])
        a = e.invars[0]


class Env:
    """Runtime values inside the replacement: outside atoms, replayed rows, stats."""

    def __init__(self, m, vals):
        self.m, self.vals, self.cache = m, vals, {}

    def get(self, atom):
        if ir.is_literal(atom):
            return ir.literal_value(atom)
        if atom in self.cache:
            return self.cache[atom]
        if atom in self.m.rowfun:
            v = self.m.rowfun[atom](self)
            self.cache[atom] = v
            return v
        return self.vals[atom]

    def stat(self, k, sel):
        if "stats" not in self.cache:
            self.cache["stats"] = self.m.compute_stats(self)
        return _apply_sel(self.cache["stats"][STATS[k]], sel)


STATS = {"m": 0, "lse": 1, "zy": 2, "zsum": 3}


def row_index_labels(view, e):
    """``lp[arange(N), y]`` on [N, V]: the labels atom ([N, 1]), else None."""
    L, idx = e.invars
    dn, p = e.params["dimension_numbers"], e.params
    if (L.aval.ndim != 2 or tuple(dn.offset_dims) != () or tuple(dn.collapsed_slice_dims) != (0, 1)
            or tuple(dn.start_index_map) != (0, 1) or tuple(dn.operand_batching_dims) != ()
            or tuple(p["slice_sizes"]) != (1, 1) or idx.aval.shape != (L.aval.shape[0], 2)):
        return None
    c = view.producer_eqn(idx)
    if c is None or c.primitive.name != "concatenate" or len(c.invars) != 2:
        return None
    r, y = c.invars
    n = L.aval.shape[0]
    seen = set()
    r = follow(view, r, ("broadcast_in_dim",), seen)
    # arange(N), possibly wrapped for negative indices or already folded to a constant
    val = view.constant_value(r) if ir.is_var(r) and r.aval.size == n else None
    if val is None or not np.array_equal(np.asarray(val).reshape(-1), np.arange(n)):
        return None
    return y


def reaches_softmax(view, z, is_v) -> bool:
    """Whether an exp or a gather reads a [rows, V] value computed from ``z``."""
    stack, seen = [z], set()
    while stack:
        a = stack.pop()
        for k in view.users.get(a, ()):
            e = view.eqns[k]
            if k in seen:
                continue
            seen.add(k)
            if e.primitive.name in ("exp", "gather"):
                return True
            stack.extend(o for o in e.outvars if ir.is_var(o) and is_v(o))
    return False
