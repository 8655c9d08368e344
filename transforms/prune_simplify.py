"""The ``simplify`` pass of the prune family: exact algebraic identities, written as patterns
on the engine user rules use (:mod:`graphopt.patterns`: commutative primitives match in
both operand orders, literals match exactly), one table ``IDENTITIES``; ``SIMPLIFY`` runs
them per root primitive (default: keep the equation).

x*1, x+0, x-0, x/1, x**1, -(-x), max(x, x) on integers, transpose and reshape chains, no-op
converts/broadcasts/squeezes/reductions/slices/concatenations, select on equal cases or a
constant predicate. Rules that would change NaN/Inf behaviour (x*0 -> 0, x-x -> 0) are
deliberately absent, and so are the float max(x, x) and max over no axes: their values are
x, but JAX's derivative of a max at NaN is 0 (or NaN), not x's 1. Registered (with the rest
of the family) by ``prune``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from graphopt import ir
from graphopt.interpreter import RuleTable, Rewriter, Stats, rewrite, keep
from graphopt.passes import PassContext, PassResult
from graphopt.patterns import Pat, View, lit, match, op, wild


@dataclasses.dataclass(frozen=True)
class Identity:
    """``pattern`` (rooted at the equation) equals ``result``: the name of a bound atom, or
    ``result(rw, bindings, eqn) -> atoms | None`` building it. ``when(eqn)`` guards."""
    rule: str  # "{prim}" stands for the root's primitive in the hit's name
    pattern: Pat
    result: str | Callable = "x"
    when: Callable | None = None


X = wild("x")
_identity_perm = lambda p: tuple(p) == tuple(range(len(p)))  # noqa: E731


def _float_choice(eqn) -> bool:
    """A float max/min: JAX differentiates it by equality with the result, 0 where NaN."""
    return eqn.primitive.name in ("max", "min", "reduce_max", "reduce_min") \
        and jax.numpy.issubdtype(eqn.outvars[0].aval.dtype, jax.numpy.inexact)


def _full_slice(eqn) -> bool:
    p, shape = eqn.params, eqn.invars[0].aval.shape
    return (all(s == 0 for s in p["start_indices"]) and tuple(p["limit_indices"]) == shape
            and (p["strides"] is None or all(s == 1 for s in p["strides"])))


def _transpose_chain(rw, b, eqn):
    # transpose(transpose(y, p), q) = transpose(y, p[q]).
    inner = rw.state.producer_eqn(b.atoms["inner"]).params["permutation"]
    composed = tuple(inner[i] for i in eqn.params["permutation"])
    if _identity_perm(composed) and _same(eqn, b.atoms["y"]):
        return [b.atoms["y"]]
    return rw.bind(lambda a: jax.lax.transpose(a, composed), b.atoms["y"])


def _reshape_chain(rw, b, eqn):
    # reshape(reshape(y, s1), s2) = reshape(y, s2): row-major order is kept by both.
    if _same(eqn, b.atoms["y"]):
        return [b.atoms["y"]]
    shape = eqn.outvars[0].aval.shape
    return rw.bind(lambda a: jax.lax.reshape(a, shape), b.atoms["y"])


def _chosen_case(rw, b, eqn):
    return [b.atoms[f"c{int(b.lits['p'])}"]]


def _cases(n):
    return [wild(f"c{k}") for k in range(n)]


IDENTITIES = [
    # x * 1 = x, x + 0 = x (exact up to the sign of zero: -0 + 0 is +0), x - 0 = x, x / 1 = x
    # (integer division too), x ** 1 = x, -(-x) = x: exact, also for NaN and Inf.
    Identity("mul_one", op("mul", X, lit(1))),
    Identity("add_zero", op(("add", "add_any"), X, lit(0), commutative=True)),
    Identity("sub_zero", op("sub", X, lit(0))),
    Identity("div_one", op("div", X, lit(1))),
    Identity("pow_one", op("integer_pow", X, y=1)),
    Identity("neg_neg", op("neg", op("neg", X))),
    # max(x, x) = min(x, x) = x & x = x | x = x; not on floats (the derivative at NaN differs).
    Identity("{prim}_self", op(("max", "min", "and", "or"), X, X),
             when=lambda e: not _float_choice(e)),
    Identity("transpose_identity", op("transpose", X, permutation=_identity_perm)),
    Identity("transpose_transpose", op("transpose", op("transpose", wild("y"), name="inner")),
             _transpose_chain),
    Identity("reshape_noop", op("reshape", X, dimensions=None)),
    Identity("reshape_reshape", op("reshape", op("reshape", wild("y"), dimensions=None),
                                   dimensions=None), _reshape_chain),
    Identity("squeeze_noop", op("squeeze", X, dimensions=lambda d: not d)),
    # A convert to the dtype (and weak type) the value already has does nothing.
    Identity("convert_noop", op("convert_element_type", X)),
    Identity("broadcast_noop", op("broadcast_in_dim", wild("x", pred=ir.is_var),
                                  broadcast_dimensions=_identity_perm)),
    # Reducing over no axes is the identity (a float max/min's derivative at NaN is not).
    Identity("reduce_noop", op(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                "reduce_and", "reduce_or"), X, axes=lambda a: not a),
             when=lambda e: not _float_choice(e)),
    *[Identity("select_same", op("select_n", wild("p"), *[X] * n)) for n in (2, 3, 4)],
    *[Identity("select_const", op("select_n", lit(name="p"), *_cases(n)), _chosen_case)
      for n in (2, 3, 4)],
    Identity("concat_single", op("concatenate", X)),
    Identity("slice_full", op("slice", X), when=_full_slice),
]
BY_ROOT: dict[str, list[Identity]] = {}
for _ident in IDENTITIES:
    for _prim in sorted(_ident.pattern.prims):
        BY_ROOT.setdefault(_prim, []).append(_ident)


def _same(eqn, atom) -> bool:
    """``atom`` can stand for the output: equal shape, dtype and weak type."""
    return ir.is_var(atom) and ir.same_aval(atom.aval, eqn.outvars[0].aval)


def _simplify(rw: Rewriter, eqn):
    if len(eqn.outvars) != 1:
        return None
    for ident in BY_ROOT[eqn.primitive.name]:
        if ident.when is not None and not ident.when(eqn):
            continue
        b = match(rw.state, ident.pattern, eqn.outvars[0], eqn=eqn)
        if b is None:
            continue
        if callable(ident.result):
            out = ident.result(rw, b, eqn)
        else:
            out = [b.atoms[ident.result]] if _same(eqn, b.atoms[ident.result]) else None
        if out is not None:
            rw.hit("simplify." + ident.rule.format(prim=eqn.primitive.name))
            return out
    return None


SIMPLIFY = RuleTable("simplify", default=keep)
SIMPLIFY.register(*BY_ROOT)(_simplify)


class _Emitted:
    """The equations emitted so far at one level, as the pattern matcher's view: producers
    of atoms (found lazily, as emission goes on) and scalar constants."""

    scalar_value = View.scalar_value  # literals, broadcasts/converts/reshapes of them, consts

    def __init__(self, rw: Rewriter, level: ir.ClosedJaxpr):
        self.eqns, self.seen, self._producer = rw.eqns, 0, {}
        self.const_values = dict(zip(level.jaxpr.constvars, level.consts))

    @property
    def producer(self) -> dict:
        """var -> index of the emitted equation computing it (caught up on each read)."""
        if self.seen > len(self.eqns):  # a rule's equations were taken back (CannotRewrite)
            self.seen, self._producer = 0, {}
        for i in range(self.seen, len(self.eqns)):
            for v in self.eqns[i].outvars:
                self._producer[v] = i
        self.seen = len(self.eqns)
        return self._producer

    def producer_eqn(self, atom):
        i = self.producer.get(atom) if ir.is_var(atom) else None
        return None if i is None else self.eqns[i]


def simplify(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Algebraic simplification with exact identities only."""
    stats = Stats()
    out = rewrite(cj, SIMPLIFY, stats, state=_Emitted)
    return PassResult(out, out is not cj, stats)


__all__ = ["SIMPLIFY", "IDENTITIES", "Identity", "simplify"]
