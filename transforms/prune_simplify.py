"""The ``simplify`` pass of the prune family: exact algebraic identities, one rule per
primitive in ``SIMPLIFY`` (default: keep the equation).

x*1, x+0, x-0, x/1, x**1, -(-x), max(x, x) on integers, transpose and reshape chains, no-op
converts/broadcasts/squeezes/reductions/slices/concatenations, select on equal cases or a
constant predicate. Rules that would change NaN/Inf behaviour (x*0 -> 0, x-x -> 0) are
deliberately absent, and so are the float max(x, x) and max over no axes: their values are
x, but JAX's derivative of a max at NaN is 0 (or NaN), not x's 1. Registered (with the rest of the family) by ``prune``.
"""
from __future__ import annotations

import numpy as np

import jax

from graphopt import ir
from graphopt.interpreter import RuleTable, Rewriter, Stats, rewrite, keep
from graphopt.passes import PassContext, PassResult

SIMPLIFY = RuleTable("simplify", default=keep)


def _scalar_const(rw: Rewriter, atom):
    """The value of ``atom`` if it is a constant whose elements are all equal, else None."""
    if not ir.is_literal(atom):
        prod = rw.graph_producer.get(atom)
        if prod is None or prod.primitive.name != "broadcast_in_dim" \
                or not ir.is_literal(prod.invars[0]):
            return None
        atom = prod.invars[0]
    if not atom.aval.shape:  # a scalar literal: the common case, no NumPy needed
        return ir.literal_value(atom)
    v = np.asarray(ir.literal_value(atom))
    if v.size == 0:
        return None
    first = v.flat[0]
    return first if np.all(v == first) else None


def _is(rw, atom, value) -> bool:
    c = _scalar_const(rw, atom)
    # Compare as Python numbers; a NaN constant never matches an identity element.
    return c is not None and bool(c == value) and not (isinstance(c, float) and np.isnan(c))


def _same(eqn, atom) -> bool:
    """``atom`` can stand for the output: equal shape, dtype and weak type."""
    return ir.is_var(atom) and ir.same_aval(atom.aval, eqn.outvars[0].aval)


def _float_choice(eqn) -> bool:
    """A float max/min: JAX differentiates it by equality with the result, 0 where NaN."""
    return eqn.primitive.name in ("max", "min", "reduce_max", "reduce_min") \
        and jax.numpy.issubdtype(eqn.outvars[0].aval.dtype, jax.numpy.inexact)


def _replace_by(rw, eqn, atom, rule):
    rw.hit(f"simplify.{rule}")
    return [atom]


@SIMPLIFY.register("mul")
def _mul(rw, eqn):
    x, y = eqn.invars
    # x * 1 = x and 1 * x = x exactly (also for NaN and Inf).
    if _is(rw, y, 1) and _same(eqn, x):
        return _replace_by(rw, eqn, x, "mul_one")
    if _is(rw, x, 1) and _same(eqn, y):
        return _replace_by(rw, eqn, y, "mul_one")
    return None


@SIMPLIFY.register("add", "add_any")
def _add(rw, eqn):
    x, y = eqn.invars
    # x + 0 = x (exact up to the sign of zero: -0 + 0 is +0, and the two compare equal).
    if _is(rw, y, 0) and _same(eqn, x):
        return _replace_by(rw, eqn, x, "add_zero")
    if _is(rw, x, 0) and _same(eqn, y):
        return _replace_by(rw, eqn, y, "add_zero")
    return None


@SIMPLIFY.register("sub")
def _sub(rw, eqn):
    x, y = eqn.invars
    # x - 0 = x exactly.
    if _is(rw, y, 0) and _same(eqn, x):
        return _replace_by(rw, eqn, x, "sub_zero")
    return None


@SIMPLIFY.register("div")
def _div(rw, eqn):
    x, y = eqn.invars
    # x / 1 = x exactly (integer division by 1 too).
    if _is(rw, y, 1) and _same(eqn, x):
        return _replace_by(rw, eqn, x, "div_one")
    return None


@SIMPLIFY.register("integer_pow")
def _ipow(rw, eqn):
    # x ** 1 = x.
    if eqn.params["y"] == 1 and _same(eqn, eqn.invars[0]):
        return _replace_by(rw, eqn, eqn.invars[0], "pow_one")
    return None


@SIMPLIFY.register("neg")
def _neg(rw, eqn):
    # -(-x) = x exactly (negation only flips the sign bit).
    prod = rw.graph_producer.get(eqn.invars[0])
    if prod is not None and prod.primitive.name == "neg" and _same(eqn, prod.invars[0]):
        return _replace_by(rw, eqn, prod.invars[0], "neg_neg")
    return None


@SIMPLIFY.register("max", "min", "and", "or")
def _idempotent(rw, eqn):
    # max(x, x) = min(x, x) = x & x = x | x = x; not on floats (the derivative at NaN differs).
    x, y = eqn.invars
    if x is y and _same(eqn, x) and not _float_choice(eqn):
        return _replace_by(rw, eqn, x, f"{eqn.primitive.name}_self")
    return None


@SIMPLIFY.register("transpose")
def _transpose(rw, eqn):
    perm = tuple(eqn.params["permutation"])
    x = eqn.invars[0]
    # transpose by the identity permutation is x.
    if perm == tuple(range(len(perm))) and _same(eqn, x):
        return _replace_by(rw, eqn, x, "transpose_identity")
    prod = rw.graph_producer.get(x)
    if prod is not None and prod.primitive.name == "transpose":
        # transpose(transpose(y, p), q) = transpose(y, p[q]).
        inner = tuple(prod.params["permutation"])
        composed = tuple(inner[i] for i in perm)
        y = prod.invars[0]
        rw.hit("simplify.transpose_transpose")
        if composed == tuple(range(len(composed))) and _same(eqn, y):
            return [y]
        return rw.bind(lambda a: jax.lax.transpose(a, composed), y)
    return None


@SIMPLIFY.register("reshape")
def _reshape(rw, eqn):
    x = eqn.invars[0]
    if len(eqn.invars) != 1 or eqn.params.get("dimensions") is not None:
        return None
    # reshape to the shape it already has is x.
    if _same(eqn, x):
        return _replace_by(rw, eqn, x, "reshape_noop")
    prod = rw.graph_producer.get(x)
    if prod is not None and prod.primitive.name == "reshape" and len(prod.invars) == 1 \
            and prod.params.get("dimensions") is None:
        # reshape(reshape(y, s1), s2) = reshape(y, s2): row-major order is kept by both.
        y = prod.invars[0]
        rw.hit("simplify.reshape_reshape")
        if _same(eqn, y):
            return [y]
        shape = eqn.outvars[0].aval.shape
        return rw.bind(lambda a: jax.lax.reshape(a, shape), y)
    return None


@SIMPLIFY.register("squeeze")
def _squeeze(rw, eqn):
    if not eqn.params["dimensions"] and _same(eqn, eqn.invars[0]):
        return _replace_by(rw, eqn, eqn.invars[0], "squeeze_noop")
    return None


@SIMPLIFY.register("convert_element_type")
def _convert(rw, eqn):
    # A convert to the dtype (and weak type) the value already has does nothing.
    if _same(eqn, eqn.invars[0]):
        return _replace_by(rw, eqn, eqn.invars[0], "convert_noop")
    return None


@SIMPLIFY.register("broadcast_in_dim")
def _broadcast(rw, eqn):
    x = eqn.invars[0]
    dims = tuple(eqn.params["broadcast_dimensions"])
    # Broadcasting to the same shape along the identity dims is x.
    if len(eqn.invars) == 1 and ir.is_var(x) and dims == tuple(range(len(dims))) \
            and _same(eqn, x):
        return _replace_by(rw, eqn, x, "broadcast_noop")
    return None


@SIMPLIFY.register("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                   "reduce_and", "reduce_or")
def _reduce(rw, eqn):
    # Reducing over no axes is the identity (a float max/min's derivative at NaN is not).
    if not eqn.params["axes"] and _same(eqn, eqn.invars[0]) and not _float_choice(eqn):
        return _replace_by(rw, eqn, eqn.invars[0], "reduce_noop")
    return None


@SIMPLIFY.register("select_n")
def _select(rw, eqn):
    pred, *cases = eqn.invars
    # select_n(p, x, x, ...) = x.
    if all(c is cases[0] for c in cases) and _same(eqn, cases[0]):
        return _replace_by(rw, eqn, cases[0], "select_same")
    # select on a constant predicate picks one case.
    c = _scalar_const(rw, pred)
    if c is not None:
        chosen = cases[int(c)]
        if _same(eqn, chosen):
            return _replace_by(rw, eqn, chosen, "select_const")
    return None


@SIMPLIFY.register("concatenate")
def _concat(rw, eqn):
    if len(eqn.invars) == 1 and _same(eqn, eqn.invars[0]):
        return _replace_by(rw, eqn, eqn.invars[0], "concat_single")
    return None


@SIMPLIFY.register("slice")
def _slice(rw, eqn):
    # A slice covering the whole array with unit strides is the array.
    x = eqn.invars[0]
    p = eqn.params
    full = (all(s == 0 for s in p["start_indices"]) and tuple(p["limit_indices"]) == x.aval.shape
            and (p["strides"] is None or all(s == 1 for s in p["strides"])))
    if full and _same(eqn, x):
        return _replace_by(rw, eqn, x, "slice_full")
    return None


def _track_producers(rw: Rewriter, level):
    rw.graph_producer = _ProducerMap(rw)


class _ProducerMap:
    """Producer of an atom among the equations emitted so far at this level."""

    def __init__(self, rw: Rewriter):
        self.rw = rw
        self.seen = 0
        self.by_var: dict = {}

    def get(self, atom):
        if not ir.is_var(atom):
            return None
        eqns = self.rw.eqns
        for e in eqns[self.seen:]:
            for v in e.outvars:
                self.by_var[v] = e
        self.seen = len(eqns)
        return self.by_var.get(atom)


def simplify(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Algebraic simplification with exact identities only."""
    stats = Stats()
    out = rewrite(cj, SIMPLIFY, stats, setup=_track_producers)
    return PassResult(out, out is not cj, stats)


__all__ = ["SIMPLIFY", "simplify"]
