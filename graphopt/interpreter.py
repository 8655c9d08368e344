"""The rewriting interpreter: walk equations, apply a rule per primitive, rebuild.

A pass family describes its rewrite as a :class:`RuleTable` (primitive name -> rule,
plus an explicit default). :func:`rewrite` walks a closed jaxpr front to back; for each
equation it substitutes already-rewritten inputs, recurses into sub-jaxprs (cond
branches, scan/while bodies, jit, custom_jvp/vjp, remat, shard_map, ...), looks up the
rule and either keeps the equation or wires its outputs to the atoms the rule returns.

Rewrites are structural (no user Python is re-run and nothing is re-traced except the
small helper functions a rule inlines with :meth:`Rewriter.bind`), which keeps a pass
over 10k equations far cheaper than tracing them.

A rule is ``rule(rw: Rewriter, eqn) -> list[Atom] | None``:

- ``None``: keep ``eqn`` (the interpreter emits it with substituted inputs);
- a list of atoms, one per output: the outputs are replaced; the rule may have emitted
  new equations through ``rw.emit`` / ``rw.bind`` first.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from . import ir
from .errors import RewriteError

Rule = Callable[["Rewriter", Any], "list[Any] | None"]


def keep(rw: "Rewriter", eqn) -> None:
    """The default rule: leave the equation as it is."""
    return None


class RuleTable:
    """Rules of one pass family, keyed by primitive name, with an explicit default."""

    def __init__(self, name: str, default: Rule = keep):
        self.name = name
        self.default = default
        self.rules: dict[str, Rule] = {}

    def register(self, *primitive_names: str):
        """Decorator registering a rule for one or more primitive names."""
        def deco(rule: Rule) -> Rule:
            for p in primitive_names:
                self.rules[p] = rule
            return rule
        return deco

    def lookup(self, name: str) -> Rule:
        return self.rules.get(name, self.default)

    def __contains__(self, name: str) -> bool:
        return name in self.rules

    def __repr__(self):
        return f"RuleTable({self.name!r}, {len(self.rules)} rules, default={self.default.__name__})"


@dataclasses.dataclass
class Stats:
    """What one pass did: rule hits, equations it left alone because it did not know them."""
    hits: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unknown: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)  # a pass's own figures

    def hit(self, rule: str, n: int = 1) -> None:
        self.hits[rule] += n

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def merge(self, other: "Stats") -> None:
        self.hits.update(other.hits)
        self.unknown.update(other.unknown)
        for n in other.notes:
            self.note(n)
        self.details.update(other.details)

    def as_dict(self) -> dict:
        return {"hits": dict(self.hits), "unknown": dict(self.unknown), "notes": list(self.notes)}


class CannotRewrite(Exception):
    """Raised by a rule (or a Rewriter helper) to keep the equation unchanged."""


class Rewriter:
    """State of the rewrite of one jaxpr level; what a rule talks to."""

    def __init__(self, table: RuleTable, stats: Stats, allow_consts: bool, depth: int):
        self.state: Any = None  # the pass's own per-level state (``rewrite(state=...)``)
        self.table = table
        self.stats = stats
        self.allow_consts = allow_consts
        self.depth = depth
        self.env: dict = {}
        self.eqns: list = []
        self.new_consts: list = []  # (constvar, value) pairs added by rules
        self.changed = False
        self.current_eqn = None

    # -- atoms
    def read(self, atom):
        """The rewritten atom standing for ``atom`` of the input jaxpr."""
        if ir.is_var(atom):
            return self.env.get(atom, atom)
        return atom

    def write(self, var, atom) -> None:
        if ir.is_var(var):
            self.env[var] = atom

    # -- building
    def emit(self, eqn) -> None:
        self.eqns.append(eqn)

    def bind(self, fn: Callable, *atoms) -> list:
        """Trace ``fn`` on the atoms' avals, emit its equations, return its outputs."""
        inl = ir.inline(fn, atoms)
        for var, val in inl.consts:
            if not self.allow_consts:
                raise CannotRewrite("array constant inside an open sub-jaxpr")
            self.new_consts.append((var, val))
        if self.current_eqn is not None:
            # New equations inherit the source line and scope of what they replace.
            si = self.current_eqn.source_info
            inl.eqns = [e.replace(source_info=si) for e in inl.eqns]
        self.eqns.extend(inl.eqns)
        return inl.outs

    def const(self, value, aval=None):
        """An atom holding a constant: a literal for scalars, else a new constvar."""
        arr = np.asarray(value)
        if arr.ndim == 0:
            return ir.literal(arr.dtype.type(arr) if aval is None else value,
                              aval if aval is not None else ir.aval_of(arr))
        if not self.allow_consts:
            raise CannotRewrite("array constant inside an open sub-jaxpr")
        var = ir.new_var(aval if aval is not None else ir.aval_of(arr))
        self.new_consts.append((var, value))
        return var

    def hit(self, rule: str, n: int = 1) -> None:
        self.stats.hit(rule, n)
        self.changed = True


def substitute_inputs(rw: Rewriter, eqn):
    env = rw.env
    if not env:
        return eqn
    changed = False
    new_in = []
    for v in eqn.invars:
        # Literals are unhashable and never renamed; only Vars are looked up (hot loop).
        a = env.get(v, v) if isinstance(v, ir.Var) else v
        changed |= a is not v
        new_in.append(a)
    return eqn.replace(invars=new_in) if changed else eqn


def rewrite(cj: ir.ClosedJaxpr, table: RuleTable, stats: Stats | None = None, *,
            recurse: bool = True, allow_consts: bool = True, depth: int = 0,
            state: Callable | None = None, memo: dict | None = None) -> ir.ClosedJaxpr:
    """Apply ``table`` to every equation of ``cj`` (and of its sub-jaxprs).

    Returns ``cj`` itself when nothing changed, so callers can test ``is``.
    ``state(rw, cj)``, if given, runs at the start of every jaxpr level (the top one and
    each sub-jaxpr) and returns the pass's state for that level, which its rules read as
    ``rw.state`` (a CSE table, the constants known so far); nothing else is put on ``rw``.
    A sub-jaxpr shared by several equations (one jitted layer called N times) is
    rewritten once and stays shared, so rule hits count it once.
    """
    stats = stats if stats is not None else Stats()
    memo = {} if memo is None else memo

    def sub_rewrite(j, is_open):
        key = (id(j.jaxpr), tuple(id(c) for c in j.consts), is_open)
        got = memo.get(key)
        if got is not None and got[0] is j.jaxpr:  # the identity check guards against id reuse
            return got[1] if got[1] is not got[2] else j
        out = rewrite(j, table, stats, recurse=True, allow_consts=not is_open, depth=depth + 1,
                      state=state, memo=memo)
        memo[key] = (j.jaxpr, out, j)
        return out

    rw = Rewriter(table, stats, allow_consts, depth)
    if state is not None:
        rw.state = state(rw, cj)
    for eqn in cj.jaxpr.eqns:
        new = substitute_inputs(rw, eqn)
        if new is not eqn:
            rw.changed = True
        name = new.primitive.name
        if name not in ir.known_primitives():
            # Unknown primitives pass through untouched, their sub-jaxprs (kernels) included.
            stats.unknown[name] += 1
            rw.emit(new)
            continue
        if recurse and ir.has_subjaxprs(new):
            sub = ir.map_subjaxprs(new, sub_rewrite)
            if sub is not new:
                rw.changed = True
                new = sub
        rw.current_eqn = new
        mark = len(rw.eqns)
        n_consts = len(rw.new_consts)
        try:
            outs = table.lookup(name)(rw, new)
        except CannotRewrite as exc:
            del rw.eqns[mark:]
            del rw.new_consts[n_consts:]
            stats.note(f"{table.name}: kept {name}: {exc}")
            outs = None
        except Exception as exc:
            raise RewriteError(
                f"{table.name}: rule for primitive {name!r} failed on equation "
                f"`{new}` ({ir.source_line(new) or 'no source line'}): "
                f"{type(exc).__name__}: {exc}") from exc
        rw.current_eqn = None
        if outs is None:
            rw.emit(new)
            continue
        outs = list(outs)
        if len(outs) != len(new.outvars):
            raise AssertionError(f"rule for {name} in {table.name} returned {len(outs)} "
                                 f"atoms for {len(new.outvars)} outputs")
        rw.changed = True
        for v, a in zip(new.outvars, outs):
            rw.write(v, a)
    if not rw.changed:
        return cj
    return finish(cj, rw)


def finish(cj: ir.ClosedJaxpr, rw: Rewriter) -> ir.ClosedJaxpr:
    """Assemble the rewritten level: substituted outputs, added constants."""
    outvars = [rw.read(v) for v in cj.jaxpr.outvars]
    constvars = list(cj.jaxpr.constvars) + [v for v, _ in rw.new_consts]
    consts = list(cj.consts) + [c for _, c in rw.new_consts]
    jaxpr = ir.make_jaxpr_from(cj.jaxpr, constvars=constvars, outvars=outvars, eqns=rw.eqns)
    return ir.closed(jaxpr, consts)


__all__ = ["RuleTable", "Rewriter", "Stats", "CannotRewrite", "rewrite", "keep", "Rule",
           "substitute_inputs", "finish"]
