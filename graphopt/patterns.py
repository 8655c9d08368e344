"""A small pattern matcher and rewrite engine over jaxpr dataflow.

Patterns are trees (:func:`op`, :func:`wild`, :func:`lit`) or small JAX functions traced
once (:func:`pattern_from_function`). Matching follows producers, never variable names:
``op("mul", wild("x"), lit())`` matches ``b = mul 2.0 a`` as well as ``b = mul a 2.0``
(commutative primitives try both operand orders), a name bound twice must bind the same
value, and calls to ``jit`` are looked through (each jaxpr level is matched on a view in
which ``jit`` bodies are inlined).

A :class:`Rule` finds a :class:`Match` rooted at one equation and returns replacement
equations (a function traced on the matched atoms) or ``None`` for "no match".
:func:`apply_rules` applies rules to every level of a program, sub-jaxprs included.

A match is replaced only when the values it computes internally are read nowhere else
(else the original equations would have to stay and nothing is saved) and it holds no
effectful or random equation; :func:`apply_rules` says so in the stats when it skips one.

Users add their own fusions with :func:`rewrite` (like ``torch.fx``'s
``replace_pattern``); the ``user_rewrites`` pass of ``graphopt.transforms.fuse`` applies
every registered one.
"""
from __future__ import annotations

import dataclasses
import heapq
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jax

from . import ir, primitives
from .primitives import COMMUTATIVE
from .errors import GraphoptError
from .interpreter import Stats

# Params that only restate shapes: a pattern traced at example shapes ignores them
# ("dimensions" is not one: for rev and squeeze it names axes).
SHAPE_PARAMS = frozenset({"shape", "new_sizes", "sharding", "out_sharding"})


# ============================================================================ trees

class Pat:
    """A pattern node."""


@dataclasses.dataclass(eq=False)
class Wild(Pat):
    """Any atom; binds it under ``name`` (same name twice: same value)."""
    name: str | None = None
    pred: Callable | None = None


@dataclasses.dataclass(eq=False)
class Lit(Pat):
    """A scalar literal (or a broadcast of one); ``value`` None is a literal wildcard."""
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


def wild(name=None, pred=None) -> Wild:
    return Wild(name, pred)


def lit(value=None, name=None, pred=None) -> Lit:
    return Lit(value, name, pred)


def op(prim, *args, name=None, commutative=None, **params) -> Op:
    return Op(prim, tuple(args), params, name, commutative)


# ============================================================================ views

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

    def depends_on(self, atom, sources) -> bool:
        """True if ``atom`` is computed (at this level) from any var in ``sources``."""
        sources = set(sources)
        stack, seen = [atom], set()
        while stack:
            a = stack.pop()
            if not ir.is_var(a) or a in seen:
                continue
            if a in sources:
                return True
            seen.add(a)
            e = self.producer_eqn(a)
            if e is not None:
                stack.extend(e.invars)
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


# ========================================================================= matching

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


def match(view: View, pat: Pat, atom, b: Bindings = EMPTY) -> Bindings | None:
    """Match ``pat`` against the value ``atom`` of ``view``; bindings or None."""
    if isinstance(pat, Wild):
        if pat.pred is not None and not pat.pred(atom):
            return None
        return b.bind(pat.name, atom)
    if isinstance(pat, Lit):
        val = view.scalar_value(atom)
        if val is None:
            return None
        if pat.value is not None and not np.isclose(val, pat.value, rtol=1e-6, atol=0):
            return None
        if pat.pred is not None and not pat.pred(val):
            return None
        return b.bind(pat.name, atom, val) if pat.name else b
    if not isinstance(pat, Op):
        raise TypeError(f"not a pattern node: {pat!r}")
    i = view.producer.get(atom) if ir.is_var(atom) else None
    if i is None:
        return None
    e = view.eqns[i]
    prims = (pat.prim,) if isinstance(pat.prim, str) else pat.prim
    if e.primitive.name not in prims or len(e.outvars) != 1 or ir.impure(e):
        return None
    if not _params_ok(pat.params, e.params):
        return None
    b = b.bind(pat.name, atom)
    if b is None:
        return None
    b = b.add_eqn(i)
    orders = [pat.args]
    comm = pat.commutative if pat.commutative is not None else e.primitive.name in COMMUTATIVE
    if comm and len(pat.args) == 2:
        orders.append(pat.args[::-1])
    for args in orders:
        if len(args) != len(e.invars):
            continue
        bb = b
        for p, a in zip(args, e.invars):
            bb = match(view, p, a, bb)
            if bb is None:
                break
        else:
            return bb
    return None


# ============================================================================ rules

@dataclasses.dataclass
class Match:
    """What a rule found: equations it replaces, the values it redefines, how.

    ``fn(*args)`` is traced on the avals of ``args`` (atoms of the level) and must
    return one value per var in ``outs`` with the same shape and dtype.
    """
    rule: str
    eqns: frozenset
    outs: list
    fn: Callable
    args: list
    note: str = ""
    # Values computed inside the match that other equations may keep reading.
    shared_ok: frozenset = frozenset()


class Rule:
    """A rewrite rule: ``find(view, i) -> Match | None`` at equation ``i``.

    Subclass and override :meth:`find`, or give a pattern tree and a ``replace``
    callback ``replace(view, bindings, root) -> (fn, args) | None``.
    """

    def __init__(self, name: str, pattern: Pat | None = None, replace: Callable | None = None,
                 roots: Sequence[str] | None = None):
        self.name = name
        self.pattern = pattern
        self.replace = replace
        if roots is None and isinstance(pattern, Op):
            roots = (pattern.prim,) if isinstance(pattern.prim, str) else pattern.prim
        self.roots = frozenset(roots) if roots else None

    def find(self, view: View, i: int) -> Match | None:
        e = view.eqns[i]
        if len(e.outvars) != 1:
            return None
        b = match(view, self.pattern, e.outvars[0])
        if b is None:
            return None
        got = self.replace(view, b, e.outvars[0])
        if got is None:
            return None
        fn, args = got
        return Match(self.name, b.eqns, [e.outvars[0]], fn, list(args))

    def __repr__(self):
        return f"Rule({self.name!r})"


class DotRule(Rule):
    """A rule rooted at a ``dot_general`` that may match from either operand: subclasses
    define ``_find(view, i, root, side)``, tried with side 0, then 1."""

    def __init__(self, name: str):
        super().__init__(name, roots=("dot_general",))

    def find(self, view: View, i: int) -> Match | None:
        root = view.eqns[i]
        for side in (0, 1):
            m = self._find(view, i, root, side)
            if m is not None:
                return m
        return None

    def _find(self, view: View, i: int, root, side: int) -> Match | None:
        raise NotImplementedError


def _check_private(view: View, m: Match) -> str | None:
    """Why ``m`` cannot replace its equations, or None if it can."""
    outs = set(m.outs)
    for i in m.eqns:
        e = view.eqns[i]
        if ir.impure(e):
            return f"{e.primitive.name} has effects"
        for v in e.outvars:
            if not ir.is_var(v) or v in outs or v in m.shared_ok:
                continue
            if v in view.outputs:
                return f"intermediate {e.primitive.name} result is an output of the program"
            if any(u not in m.eqns for u in view.users.get(v, ())):
                return f"intermediate {e.primitive.name} result is also read elsewhere"
    return None


def _toposort(eqns: list) -> list:
    """Stable topological order (original order where valid; effects keep their order)."""
    prod = {}
    for k, e in enumerate(eqns):
        for v in e.outvars:
            if ir.is_var(v):
                prod[v] = k
    deps = [set() for _ in eqns]
    last_eff = None
    for k, e in enumerate(eqns):
        for v in e.invars:
            if ir.is_var(v) and v in prod:
                deps[k].add(prod[v])
        if ir.impure(e):
            if last_eff is not None:
                deps[k].add(last_eff)
            last_eff = k
    if all(d < k for k in range(len(eqns)) for d in deps[k]):
        return eqns
    users = [[] for _ in eqns]
    for k, ds in enumerate(deps):
        for d in ds:
            users[d].append(k)
    pending = [len(d) for d in deps]
    heap = [k for k in range(len(eqns)) if not pending[k]]
    heapq.heapify(heap)
    out = []
    while heap:
        k = heapq.heappop(heap)
        out.append(eqns[k])
        for u in users[k]:
            pending[u] -= 1
            if not pending[u]:
                heapq.heappush(heap, u)
    if len(out) != len(eqns):
        raise GraphoptError("rewrite created a cycle in the jaxpr (a replacement reads its own result)")
    return out


def _sweep_dead(eqns: list, outvars) -> list:
    live = {v for v in outvars if ir.is_var(v)}
    kept = []
    for e in reversed(eqns):
        if not any(ir.is_var(v) and v in live for v in e.outvars) and ir.removable_if_dead(e):
            continue
        live.update(v for v in e.invars if ir.is_var(v))
        kept.append(e)
    kept.reverse()
    return kept


# The fusion passes run one after another on the same jaxpr: inline its jit calls once.
# Weak keys: a jaxpr no pass holds any more leaves the cache with its constants.
_INLINED: dict = {True: weakref.WeakKeyDictionary(), False: weakref.WeakKeyDictionary()}


def _inlined(cj: ir.ClosedJaxpr, allow_consts: bool) -> ir.ClosedJaxpr:
    cache = _INLINED[bool(allow_consts)]
    if cj in cache:
        return cache[cj] or cj
    flat, changed = inline_jits(cj, allow_consts)
    cache[cj] = flat if changed else None  # a value holding its own key would never leave
    return flat


def apply_rules(cj: ir.ClosedJaxpr, rules: Sequence[Rule], stats: Stats | None = None, ctx=None,
                *, allow_consts: bool = True, recurse: bool = True) -> ir.ClosedJaxpr:
    """Apply ``rules`` at every level of ``cj``; returns ``cj`` itself if nothing fired."""
    stats = stats if stats is not None else Stats()
    flat = _inlined(cj, allow_consts)
    eqns = list(flat.jaxpr.eqns)
    sub_changed = False
    if recurse:
        for k, e in enumerate(eqns):
            if e.primitive.name in primitives.PER_DEVICE_BODIES and ir.has_subjaxprs(e):
                # replacements are traced outside the map, without its varying axes
                stats.note(f"{e.primitive.name} body left as written: rewrites are not "
                           f"traced per device")
                continue
            if ir.has_subjaxprs(e) and e.primitive.name in ir.known_primitives() and not is_fused_call(e):
                new = ir.map_subjaxprs(e, lambda j, is_open: apply_rules(
                    j, rules, stats, ctx, allow_consts=not is_open))
                if new is not e:
                    eqns[k], sub_changed = new, True
    if sub_changed:
        flat = ir.closed(ir.make_jaxpr_from(flat.jaxpr, eqns=eqns), flat.consts)
    view = View(flat, ctx, stats)
    consumed: set = set()
    repl: dict[int, list] = {}
    env: dict = {}
    new_consts: list = []
    for i in reversed(range(len(eqns))):
        if i in consumed:
            continue
        name = eqns[i].primitive.name
        for rule in rules:
            if rule.roots is not None and name not in rule.roots:
                continue
            m = rule.find(view, i)
            if m is None:
                continue
            why = _check_private(view, m) if not (m.eqns & consumed) else "overlaps another match"
            if why is None:
                why = _emit_match(view, m, i, repl, env, new_consts, allow_consts)
            if why is not None:
                stats.note(f"{m.rule}: not applied at {ir.source_line(eqns[i]) or name}: {why}"
                           + (f"; {m.note}" if m.note else ""))
                continue
            stats.hit(m.rule)
            consumed |= m.eqns
            break
    if not repl:
        return flat if sub_changed else cj
    out = []
    for k, e in enumerate(eqns):
        if k in repl:
            out.extend(repl[k])
        if k not in consumed:
            out.append(e)

    def sub(a):
        while ir.is_var(a) and a in env:
            a = env[a]
        return a
    out = [e.replace(invars=[sub(v) for v in e.invars]) for e in out]
    outvars = [sub(v) for v in flat.jaxpr.outvars]
    out = _sweep_dead(_toposort(out), outvars)
    constvars = list(flat.jaxpr.constvars) + [v for v, _ in new_consts]
    consts = list(flat.consts) + [c for _, c in new_consts]
    used = {v for e in out for v in e.invars if ir.is_var(v)} | {v for v in outvars if ir.is_var(v)}
    keep = [v in used for v in constvars]
    jaxpr = ir.make_jaxpr_from(flat.jaxpr, constvars=[v for v, k in zip(constvars, keep) if k],
                               outvars=outvars, eqns=out)
    return ir.closed(jaxpr, [c for c, k in zip(consts, keep) if k])


FUSED_PREFIX = "graphopt_fused_"


def _opaque(fn: Callable, rule: str) -> Callable:
    """``fn`` as one named ``jit`` call: matchers do not look inside it again (a
    replacement that contains its own pattern, like silu's x*sigmoid(x), stays put)."""
    def wrapped(*args):
        return fn(*args)
    wrapped.__name__ = FUSED_PREFIX + "".join(c if c.isalnum() else "_" for c in rule)
    return jax.jit(wrapped)


def is_fused_call(eqn) -> bool:
    """True for the ``jit`` equation that holds a replacement made by a rule."""
    return eqn.primitive.name == "jit" and str(eqn.params.get("name", "")).startswith(FUSED_PREFIX)


def _emit_match(view, m: Match, i, repl, env, new_consts, allow_consts) -> str | None:
    """Trace the replacement of ``m``; record it at equation ``i``. Why not, or None."""
    try:
        inl = ir.inline(_opaque(m.fn, m.rule), m.args)
    except Exception as exc:  # a replacement that cannot trace is a non-match, said in notes
        return f"replacement failed to trace: {type(exc).__name__}: {exc}"
    if len(inl.outs) != len(m.outs):
        return f"replacement returned {len(inl.outs)} values for {len(m.outs)}"
    for v, a in zip(m.outs, inl.outs):
        if tuple(v.aval.shape) != tuple(a.aval.shape) or v.aval.dtype != a.aval.dtype:
            return (f"replacement gives {ir.aval_str(a.aval)} where the program has "
                    f"{ir.aval_str(v.aval)}")
        if v in view.outputs and getattr(v.aval, "weak_type", False) != getattr(a.aval, "weak_type", False):
            return "replacement changes the weak type of a program output"
    if inl.consts and not allow_consts:
        return "replacement needs array constants inside an open sub-jaxpr"
    si = view.eqns[i].source_info
    eq = [e.replace(source_info=si) for e in inl.eqns]
    # Replacement equations inherit the matched root's source line and scope.
    repl[i] = eq
    new_consts.extend(inl.consts)
    for v, a in zip(m.outs, inl.outs):
        env[v] = a
    return None


# User rules live in patterns_user (imported last: it builds on the names above).
from .patterns_user import (LitArg, PatternRule, clear_user_rules, rewrite,  # noqa: E402
                            unregister, user_rules)

__all__ = ["Pat", "Wild", "Lit", "Op", "wild", "lit", "op", "View", "Bindings", "match", "Match",
           "Rule", "DotRule", "PatternRule", "LitArg", "apply_rules", "inline_jits", "rewrite", "user_rules",
           "clear_user_rules", "unregister", "COMMUTATIVE", "is_fused_call"]
