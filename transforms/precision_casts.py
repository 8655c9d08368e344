"""Cast placement for the precision pass: values known in several dtypes at once.

Each value of the input jaxpr maps to the atoms that hold it, one per dtype
(``Level.avail``). A consumer asks for the dtype it runs in (``Level.get``): an atom
already there is reused (so convert chains fold away), a value made by a shape op from a
smaller one is re-made from that smaller value cast instead (the cast sinks past
reshapes, transposes and broadcasts), and only otherwise is a ``convert_element_type``
emitted, right before its first use.
"""
from __future__ import annotations

import numpy as np

import jax

from graphopt import ir

# Shape ops a cast may be moved across (single data operand, elementwise-exact).
SINKABLE = frozenset({"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
                      "slice", "rev", "copy", "copy_p"})


def nelems(aval) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def is_float_dtype(dt) -> bool:
    return jax.numpy.issubdtype(dt, jax.numpy.floating)


class Level:
    """Rewrite state of one jaxpr level (the top one or one sub-jaxpr)."""

    def __init__(self):
        self.atoms: dict = {}      # original var -> {dtype: atom holding its value}
        self.low: set = set()      # original vars whose consumers may run in low precision
        self.recipe: dict = {}     # original var -> (shape-op eqn, source var) that made it
        self.eqns: list = []
        self.casts = 0
        self.changed = False
        self.site = None           # source info new casts inherit (the consuming eqn's)
        self.wide: set = set()     # original vars some use reads in their own dtype
        self.low_dtype = None      # the compute dtype

    # ---------------------------------------------------------------- values
    def avail(self, v) -> dict:
        got = self.atoms.get(v)
        if got is None:
            got = self.atoms[v] = {np.dtype(v.aval.dtype): v}
        return got

    def define(self, v, dtype_atoms: dict, low: bool = False) -> None:
        self.atoms[v] = {np.dtype(k): a for k, a in dtype_atoms.items()}
        if low:
            self.low.add(v)

    def has(self, a, dt) -> bool:
        if ir.is_literal(a):
            return np.dtype(a.aval.dtype) == dt
        return np.dtype(dt) in self.avail(a)

    def get(self, a, dt):
        """An atom holding ``a``'s value in dtype ``dt`` (emitting a cast if needed)."""
        dt = np.dtype(dt)
        if ir.is_literal(a):
            if np.dtype(a.aval.dtype) == dt:
                return a
            orig = np.asarray(ir.literal_value(a))
            with np.errstate(over="ignore"):
                val = orig.astype(dt)
            if is_float_dtype(dt) and np.all(np.isfinite(orig)):
                # saturate: a mask value like finfo(float32).min stays finite, not -inf
                big = np.finfo(dt).max
                val = np.clip(orig, -big, big).astype(dt)
            aval = a.aval.update(dtype=dt) if hasattr(a.aval, "update") else \
                ir.ShapedArray(val.shape, dt)
            return ir.literal(val[()] if val.ndim == 0 else val, aval)
        have = self.avail(a)
        if dt in have:
            return have[dt]
        rec = self.recipe.get(a)
        if rec is not None:
            eqn, src = rec
            if self.has(src, dt) or nelems(src.aval) < nelems(a.aval):
                # cast the smaller (or already cast) source, then redo the shape op on it
                s = self.get(src, dt)
                out = self.emit(eqn, [s] + [self.get(x, x.aval.dtype) if ir.is_var(x) else x
                                            for x in eqn.invars[1:]])[0]
                have[dt] = out
                return out
        # widest available source: casting down from float32 beats re-rounding bf16
        src_dt = max(have, key=lambda d: (is_float_dtype(d), np.dtype(d).itemsize))
        out = self.convert(have[src_dt], dt)
        have[dt] = out
        return out

    # ------------------------------------------------------------- emission
    def convert(self, atom, dt):
        self.casts += 1
        self.changed = True
        return self.trace(lambda x: jax.lax.convert_element_type(x, dt), [atom])[0]

    def trace(self, fn, atoms):
        inl = ir.inline(fn, atoms)
        if inl.consts:
            raise ValueError("precision: a cast helper captured an array constant")
        eqns = inl.eqns
        if self.site is not None:
            eqns = [e.replace(source_info=self.site) for e in eqns]
        self.eqns.extend(eqns)
        return inl.outs

    def emit(self, eqn, invars, **params) -> list:
        """``eqn`` on new inputs (and params): reused as is where nothing changed, else
        re-bound so its outputs get the types the new inputs imply."""
        same = len(invars) == len(eqn.invars) and all(
            a is b for a, b in zip(invars, eqn.invars))
        if same and not params:
            self.eqns.append(eqn)
            return list(eqn.outvars)
        self.changed = True
        if not params and all(ir.same_aval(a.aval, b.aval) for a, b in zip(invars, eqn.invars)):
            self.eqns.append(eqn.replace(invars=list(invars)))
            return list(eqn.outvars)
        site = self.site
        self.site = eqn.source_info
        try:
            return self.trace(lambda *xs: ir.bind_eqn(eqn, xs, **params), list(invars))
        finally:
            self.site = site


__all__ = ["Level", "SINKABLE", "nelems", "is_float_dtype"]
