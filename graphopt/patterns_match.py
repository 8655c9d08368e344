"""Pattern trees, the per-level view a rule looks at, and matching a tree against it.

Part of :mod:`graphopt.patterns` (import the names from there): :func:`op`, :func:`wild`,
:func:`lit` build trees; :class:`View` is one jaxpr level with ``jit`` calls inlined
(:func:`inline_jits`); :func:`match` follows producers, trying both operand orders of a
commutative primitive, and a name bound twice must bind the same value.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

import jax

from . import ir
from .primitives import COMMUTATIVE
from .interpreter import Stats

# Params that only restate shapes: a pattern traced at example shapes ignores them
# ("dimensions" is not one: for rev and squeeze it names axes).
SHAPE_PARAMS = frozenset({"shape", "new_sizes", "sharding", "out_sharding"})


class Pat:
    """A pattern node."""


@dataclasses.dataclass(eq=False)
class Wild(Pat):
    """Any atom; binds it under ``name`` (same name twice: same value)."""
    name: str | None = None
    pred: Callable | None = None


@dataclasses.dataclass(eq=False)
class Lit(Pat):
    """A scalar literal (or a broadcast of one) equal to ``value`` exactly, in the matched
    value's dtype; ``value`` None is a literal wildcard."""
    value: Any = None
    name: str | None = None
    pred: Callable | None = None


@dataclasses.dataclass(eq=False)
class Op(Pat):
    """An equation of primitive ``prim`` (a name or a tuple of names) on ``args``.

    ``params`` values are compared for equality, or called as predicates when callable.
    """
    prim: str | tuple
    args: tuple
    params: dict = dataclasses.field(default_factory=dict)
    name: str | None = None
    commutative: bool | None = None

    def __post_init__(self):  # matching tests membership on every equation: a set, once
        self.prims = frozenset((self.prim,) if isinstance(self.prim, str) else self.prim)
        # operand positions, literals and sub-patterns before wildcards: cheap rejections first
        self.order = sorted(range(len(self.args)), key=lambda k: isinstance(self.args[k], Wild))


def wild(name=None, pred=None) -> Wild:
    return Wild(name, pred)


def lit(value=None, name=None, pred=None) -> Lit:
    return Lit(value, name, pred)


def op(prim, *args, name=None, commutative=None, **params) -> Op:
    return Op(prim, tuple(args), params, name, commutative)


FUSED_PREFIX = "graphopt_fused_"


def is_fused_call(eqn) -> bool:
    """True for the ``jit`` equation that holds a replacement made by a rule."""
    return eqn.primitive.name == "jit" and str(eqn.params.get("name", "")).startswith(FUSED_PREFIX)


def inline_jits(cj: ir.ClosedJaxpr, allow_consts: bool = True) -> tuple[ir.ClosedJaxpr, bool]:
    """``cj`` with every (nested) ``jit`` call at this level inlined; (result, changed).

    Variables are renamed on the way in, since one traced body may be called twice.
    """
    eqns, env = [], {}
    constvars, consts = list(cj.jaxpr.constvars), list(cj.consts)
    changed = False

    def look(a):
        while ir.is_var(a) and a in env:
            a = env[a]
        return a

    def emit(e):
        nonlocal changed
        if (e.primitive.name == "jit" and not ir.effectful(e) and not is_fused_call(e)
                and not ir.pins_placement(e)):  # shardings/donation would be lost
            body = e.params["jaxpr"]
            if body.consts and not allow_consts:
                eqns.append(e)
                return
            cvs = [ir.new_var(ir.aval_of(c)) for c in body.consts]
            constvars.extend(cvs)
            consts.extend(body.consts)
            inner, outs = ir.copy_eqns(body.jaxpr, [look(v) for v in e.invars], cvs)
            changed = True
            # Emitting one by one flattens nested jit calls too.
            for ie in inner:
                emit(ie)
            for v, a in zip(e.outvars, outs):
                if ir.is_var(v):
                    env[v] = a
            return
        eqns.append(e)

    for e in cj.jaxpr.eqns:
        ins = [look(v) for v in e.invars]
        emit(e.replace(invars=ins) if any(a is not b for a, b in zip(ins, e.invars)) else e)
    if not changed:
        return cj, False
    # Inlined equations read renamed atoms through env too.
    fixed = []
    for e in eqns:
        ins = [look(v) for v in e.invars]
        fixed.append(e.replace(invars=ins) if any(a is not b for a, b in zip(ins, e.invars)) else e)
    outvars = [look(v) for v in cj.jaxpr.outvars]
    jaxpr = ir.make_jaxpr_from(cj.jaxpr, constvars=constvars, outvars=outvars, eqns=fixed)
    return ir.closed(jaxpr, consts), True


class View(ir.Graph):
    """A graph over one jaxpr level, with the consts' values and a pass context."""

    def __init__(self, cj: ir.ClosedJaxpr, ctx=None, stats: Stats | None = None):
        super().__init__(cj)
        self.closed = cj
        self.const_values = dict(zip(cj.jaxpr.constvars, cj.consts))
        self.ctx = ctx
        self.stats = stats if stats is not None else Stats()  # the running pass's report
        self._descendants: dict = {}

    def note(self, text: str) -> None:
        """A line for the running pass's report (a refusal, a kernel choice)."""
        self.stats.note(text)

    def option(self, name: str, default=None):
        """A pass option from the pipeline's context (``default`` without one)."""
        return self.ctx.option(name, default) if self.ctx is not None else default

    def scalar_value(self, atom):
        """The value of a scalar literal, or of a broadcast of one; else None."""
        while True:
            if ir.is_literal(atom):
                v = np.asarray(ir.literal_value(atom))
                return v.item() if v.size == 1 else None
            e = self.producer_eqn(atom)
            if e is None:
                c = self.const_values.get(atom)
                if c is not None and np.size(c) == 1:
                    return np.asarray(c).item()
                return None
            if e.primitive.name in ("broadcast_in_dim", "convert_element_type", "reshape"):
                atom = e.invars[0]
                continue
            return None

    def depends_on(self, atom, sources, first: int = 0, *, many: bool = False) -> bool:
        """True if ``atom`` (any of them, with ``many``) is computed (at this level) from any
        var in ``sources``. Sources all produced at or after equation ``first``: the walk
        never goes below it (linear in the span, not the graph)."""
        sources, stack, seen = set(sources), list(atom) if many else [atom], set()
        while stack:
            a = stack.pop()
            if not ir.is_var(a) or a in seen:
                continue
            if a in sources:
                return True
            seen.add(a)
            i = self.producer.get(a)
            if i is not None and i >= first:
                stack.extend(self.eqns[i].invars)
        return False

    def ancestors(self, atom) -> tuple[list[int], list]:
        """(equation indices, leaf atoms) of everything ``atom`` is computed from."""
        idx, leaves, stack, seen = set(), [], [atom], set()
        while stack:
            a = stack.pop()
            if not ir.is_var(a) or a in seen:
                if ir.is_literal(a):
                    leaves.append(a)
                continue
            seen.add(a)
            i = self.producer.get(a)
            if i is None:
                leaves.append(a)
            else:
                idx.add(i)
                stack.extend(self.eqns[i].invars)
        return sorted(idx), leaves

    def constant_value(self, atom, max_elems: int = 1 << 22):
        """Evaluate ``atom`` if it depends only on literals and consts; else None."""
        if ir.is_literal(atom):
            return np.asarray(ir.literal_value(atom))
        if int(np.prod(atom.aval.shape, dtype=np.int64)) > max_elems:
            return None
        idx, leaves = self.ancestors(atom)
        if any(ir.is_var(v) and v not in self.const_values for v in leaves):
            return None
        if any(ir.impure(self.eqns[i]) for i in idx):
            return None
        cvs = [v for v in dict.fromkeys(l for l in leaves if ir.is_var(l))]
        jaxpr = ir.make_jaxpr_from(self.jaxpr, constvars=cvs, invars=[], outvars=[atom],
                                   eqns=[self.eqns[i] for i in idx], effects=frozenset())
        # Passes may run while an outer transform traces: evaluate eagerly regardless.
        with jax.ensure_compile_time_eval():
            val = ir.eval_jaxpr(ir.closed(jaxpr, [self.const_values[v] for v in cvs]))[0]
        return np.asarray(val)


@dataclasses.dataclass(frozen=True)
class Bindings:
    atoms: dict
    eqns: frozenset
    lits: dict

    def bind(self, name, atom, value=None) -> "Bindings | None":
        if name is None:
            return self
        old = self.atoms.get(name)
        if old is not None and not _same_atom(old, atom):
            return None
        lits = dict(self.lits, **{name: value}) if value is not None else self.lits
        return Bindings({**self.atoms, name: atom}, self.eqns, lits)

    def add_eqn(self, i) -> "Bindings":
        return Bindings(self.atoms, self.eqns | {i}, self.lits)


EMPTY = Bindings({}, frozenset(), {})


def _same_atom(a, b) -> bool:
    if a is b:
        return True
    if ir.is_literal(a) and ir.is_literal(b):
        return np.array_equal(np.asarray(a.val), np.asarray(b.val)) and a.aval.dtype == b.aval.dtype
    return False


def _params_ok(want: dict, have: dict) -> bool:
    for k, w in want.items():
        h = have.get(k)
        if callable(w) and not isinstance(w, type):
            if not w(h):
                return False
        elif h != w:
            return False
    return True


def _lit_equal(val, want, atom) -> bool:
    """Exact equality in the matched atom's dtype (a pattern's 0.1 is float32's 0.1 there)."""
    dtype = getattr(getattr(atom, "aval", None), "dtype", None)
    try:
        return bool(np.asarray(want).astype(dtype) == np.asarray(val).astype(dtype))
    except (TypeError, ValueError, OverflowError):
        return False


def match(view: View, pat: Pat, atom, b: Bindings = EMPTY, eqn=None) -> Bindings | None:
    """Match ``pat`` against the value ``atom`` of ``view``; bindings or None. ``eqn``: the
    equation computing ``atom`` where the view does not hold it yet (an interpreter rule's
    current equation, not recorded in the bindings' equations)."""
    if isinstance(pat, Wild):
        if pat.pred is not None and not pat.pred(atom):
            return None
        return b.bind(pat.name, atom)
    if isinstance(pat, Lit):
        val = view.scalar_value(atom)
        if val is None:
            return None
        if pat.value is not None and not _lit_equal(val, pat.value, atom):
            return None
        if pat.pred is not None and not pat.pred(val):
            return None
        return b.bind(pat.name, atom, val) if pat.name else b
    if not isinstance(pat, Op):
        raise TypeError(f"not a pattern node: {pat!r}")
    i = -1 if eqn is not None else view.producer.get(atom) if ir.is_var(atom) else None
    if i is None:
        return None
    e = view.eqns[i] if eqn is None else eqn
    if e.primitive.name not in pat.prims or len(e.invars) != len(pat.args) \
            or len(e.outvars) != 1 or ir.impure(e):
        return None
    if pat.params and not _params_ok(pat.params, e.params):
        return None
    b = b.bind(pat.name, atom)
    if b is None:
        return None
    b = b.add_eqn(i) if i >= 0 else b
    orders = [e.invars]
    comm = pat.commutative if pat.commutative is not None else e.primitive.name in COMMUTATIVE
    if comm and len(pat.args) == 2:
        orders.append(e.invars[::-1])
    for invars in orders:
        bb = b
        for k in pat.order:
            bb = match(view, pat.args[k], invars[k], bb)
            if bb is None:
                break
        else:
            return bb
    return None
