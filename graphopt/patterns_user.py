"""User-defined rewrites: ``rewrite(pattern, replacement)``, like torch.fx's replace_pattern.

A pattern is a small JAX function traced once on example arguments (shapes are not part
of the pattern; ``LitArg()`` arguments match any scalar constant) or a pattern tree from
:mod:`graphopt.patterns`. Registered rules run in the ``user_rewrites`` pass of
``graphopt.transforms.fuse``. A rule must not fire where its replacement would change
the value: that is the user's promise, checked only by ``optimize(check=True)``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import ir
from .errors import GraphoptError
from .interpreter import Stats
from .patterns_apply import Rule, apply_rules
from .patterns_match import SHAPE_PARAMS, Bindings, Lit, Op, Pat, Wild, inline_jits


class LitArg:
    """Placeholder argument of a pattern function: a literal wildcard (any scalar constant)."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)


def _tree_from_jaxpr(cj: ir.ClosedJaxpr, arg_nodes: list) -> Pat:
    cj, _ = inline_jits(cj)
    if cj.consts:
        raise GraphoptError("pattern function captured an array constant; pass it as an argument")
    jaxpr = cj.jaxpr
    if len(jaxpr.outvars) != 1:
        raise GraphoptError(f"a pattern function returns one array, got {len(jaxpr.outvars)}")
    node_of = dict(zip(jaxpr.invars, arg_nodes))
    prod = {v: e for e in jaxpr.eqns for v in e.outvars}
    uses: dict = {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if ir.is_var(v):
                uses[v] = uses.get(v, 0) + 1

    def build(a):
        if ir.is_literal(a):
            return Lit(np.asarray(ir.literal_value(a)).item())
        if a in node_of:
            return node_of[a]
        e = prod[a]
        if len(e.outvars) != 1:
            raise GraphoptError(f"pattern uses multi-output primitive {e.primitive.name}")
        params = {k: v for k, v in e.params.items() if k not in SHAPE_PARAMS}
        # A value used twice is named, so both uses must reach the same equation.
        node = Op(e.primitive.name, tuple(build(x) for x in e.invars), params,
                  name=f"_v{id(a)}" if uses.get(a, 0) > 1 else None)
        node_of[a] = node
        return node
    return build(jaxpr.outvars[0])


class PatternRule(Rule):
    """A user rewrite: ``pattern`` (function or tree) → ``replacement``."""

    def __init__(self, pattern, replacement: Callable, *example_args, name: str | None = None):
        if not callable(replacement):
            raise TypeError(f"graphopt.rewrite: replacement must be a function, got {replacement!r}")
        nm = name or f"user.{getattr(pattern, '__name__', 'pattern')}"
        if isinstance(pattern, Pat):
            tree, self.arg_names = pattern, None
        elif callable(pattern):
            tree = self._trace(pattern, example_args)
        else:
            raise TypeError("graphopt.rewrite: pattern must be a JAX function or a pattern tree "
                            f"(graphopt.patterns.op/wild/lit), got {type(pattern).__name__}")
        super().__init__(nm, tree, self._replace)
        self.replacement = replacement

    def _trace(self, fn, example_args):
        import inspect
        if not example_args:
            try:
                n = len(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                raise GraphoptError("graphopt.rewrite: give example arguments for this pattern") from None
            example_args = [np.zeros((8, 8), np.float32)] * n
        avals, nodes = [], []
        for k, a in enumerate(example_args):
            if isinstance(a, LitArg):
                avals.append(ir.ShapedArray((), a.dtype))
                nodes.append(Lit(None, f"arg{k}"))
            else:
                aval = ir.aval_of(a)
                avals.append(aval)
                nodes.append(Wild(f"arg{k}"))
        self.arg_names = [f"arg{k}" for k in range(len(example_args))]
        try:
            cj = ir.trace_flat(fn, avals)
        except Exception as exc:
            raise GraphoptError(f"graphopt.rewrite: pattern {getattr(fn, '__name__', fn)} failed to "
                                f"trace on {[ir.aval_str(a) for a in avals]}: {exc}") from exc
        return _tree_from_jaxpr(cj, nodes)

    def _replace(self, view, b: Bindings, root):
        if self.arg_names is None:
            names = [k for k in b.atoms if not k.startswith("_v")]
            atoms = [b.atoms[k] for k in names]
            fn = lambda *xs: self.replacement(**dict(zip(names, xs)))  # noqa: E731
            return fn, atoms
        missing = [k for k in self.arg_names if k not in b.atoms]
        if missing:
            return None  # an argument the pattern never reads cannot be bound
        return self.replacement, [b.atoms[k] for k in self.arg_names]

    def apply(self, cj: ir.ClosedJaxpr, stats: Stats | None = None) -> ir.ClosedJaxpr:
        return apply_rules(cj, [self], stats)


_USER_RULES: list[PatternRule] = []


def rewrite(pattern, replacement: Callable, *example_args, name: str | None = None,
            register: bool = True) -> PatternRule:
    """Register a user-defined fusion: every match of ``pattern`` becomes ``replacement``.

    ``pattern`` is a JAX function (traced once on ``example_args``, default f32[8,8]
    arrays; pass :class:`LitArg` for an argument that matches any scalar constant) or a
    pattern tree. Shapes are not part of the pattern; ``replacement`` is traced on the
    matched values' shapes and gets the pattern's arguments (keywords for trees).
    Registered rules run in the ``user_rewrites`` pass (part of the ``fuse`` group).
    """
    rule = PatternRule(pattern, replacement, *example_args, name=name)
    if register:
        _USER_RULES.append(rule)
    return rule


def user_rules() -> list[PatternRule]:
    return list(_USER_RULES)


def clear_user_rules() -> None:
    _USER_RULES.clear()


def unregister(rule: PatternRule) -> None:
    if rule in _USER_RULES:
        _USER_RULES.remove(rule)


__all__ = ["LitArg", "PatternRule", "rewrite", "user_rules", "clear_user_rules", "unregister"]
