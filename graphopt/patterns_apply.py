"""Rules and applying them: :class:`Match`, :class:`Rule`, :class:`DotRule` and
:func:`apply_rules`, which rewrites every level of a program, sub-jaxprs included.

Part of :mod:`graphopt.patterns` (import the names from there). A match is replaced only
when the values it computes internally are read nowhere else and it holds no effectful
or random equation; :func:`apply_rules` says so in the stats when it skips one.
"""
from __future__ import annotations

import dataclasses
import heapq
import weakref
from collections.abc import Callable, Sequence

import jax

from . import ir, primitives
from .errors import GraphoptError
from .interpreter import Stats
from .patterns_match import FUSED_PREFIX, Op, Pat, View, inline_jits, is_fused_call, match

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
            roots = pattern.prims
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


def _opaque(fn: Callable, rule: str) -> Callable:
    """``fn`` as one named ``jit`` call: matchers do not look inside it again (a
    replacement that contains its own pattern, like silu's x*sigmoid(x), stays put)."""
    def wrapped(*args):
        return fn(*args)
    wrapped.__name__ = FUSED_PREFIX + "".join(c if c.isalnum() else "_" for c in rule)
    return jax.jit(wrapped)


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
