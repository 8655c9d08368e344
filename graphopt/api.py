"""The user-facing entry points: ``optimize`` and the default pipeline.

``optimize`` feels like ``jax.jit``: it works with and without arguments, honours
static arguments, caches the rewritten program per abstract input signature, jits by
default, and returns a function that composes with ``jax.grad``, ``jax.vmap`` and
``jax.jit`` inside or outside. This is the only core module that imports
``graphopt.transforms`` (to register the pass families).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jax

from . import ir
from .errors import EquivalenceError, GraphoptError
from .passes import Pipeline, PassContext, placement_of, registered_passes, resolve
from .report import Report

# Registering the pass families is the reason for these imports.
from graphopt import transforms as _transforms  # noqa: F401

DEFAULT_PASSES: tuple[str, ...] = ("prune",)


def default_passes() -> list[str]:
    """The default pipeline: pruning, then the exact fusions registered as default."""
    return list(DEFAULT_PASSES) + list(_transforms.DEFAULT_EXTRA_PASSES)


@dataclasses.dataclass
class _Entry:
    """The traced and rewritten program for one abstract input signature."""
    original: ir.ClosedJaxpr
    optimized: ir.ClosedJaxpr
    out_tree: Any
    report: Report
    run: Callable
    checked: bool = False


def _is_arraylike(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)) \
        or hasattr(x, "aval") or isinstance(x, jax.ShapeDtypeStruct)


def _leaf_spec(x):
    aval = ir.aval_of(x) if not isinstance(x, (bool, int, float, complex)) else None
    if aval is None:  # Python int/float/complex are weakly typed, like under jax.jit; bool is not
        arr = jax.numpy.asarray(x)
        return (arr.shape, arr.dtype, not isinstance(x, bool))
    return (tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False)))


class Optimized:
    """A function rewritten by graphopt's pipeline; call it like the original."""

    def __init__(self, fun: Callable, *, passes=None, check: bool = False,
                 static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = (),
                 jit: bool = True, options: dict | None = None, max_rounds: int = 4):
        if not callable(fun):
            raise TypeError(f"graphopt.optimize expects a function, got {type(fun).__name__}")
        self.fun = fun
        functools.update_wrapper(self, fun)
        if not hasattr(self, "__name__"):  # functools.partial and callable objects have none
            self.__name__ = getattr(type(fun), "__name__", "function")
        self.options = dict(options or {})
        self.pass_specs = list(passes) if passes is not None else default_passes()
        if self.options.get("memory_budget") is not None and "remat" not in self.pass_specs:
            # A memory budget asks for rematerialization after the other passes.
            self.pass_specs.append("remat")
        self.pipeline = Pipeline(self.pass_specs, check=True, max_rounds=max_rounds)
        self.check = check
        self.jit = jit
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        try:
            self._sig = inspect.signature(fun)
        except (TypeError, ValueError):
            self._sig = None
        if self._sig is not None and any(p.kind is p.VAR_POSITIONAL
                                         for p in self._sig.parameters.values()):
            self._sig = None  # *args: static_argnums count positions, as in jax.jit
        self._cache: dict = {}
        # jax.jit must see fun's signature to map static args given by name or position.
        inner = functools.wraps(fun)(lambda *a, **k: self._inner(*a, **k))
        self._call = (jax.jit(inner, static_argnums=self.static_argnums or None,
                              static_argnames=self.static_argnames or None)
                      if jit else self._inner)

    # ------------------------------------------------------------------ arguments
    def _split(self, args, kwargs):
        """(dynamic {name: value}, static key, rebuild(dynamic) -> (args, kwargs))."""
        static_names = set(self.static_argnames)
        if self._sig is not None:
            try:
                bound = self._sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"graphopt.optimize({self.__name__}): {exc}") from None
            params = list(self._sig.parameters)
            for i in self.static_argnums:
                if i < len(params):
                    static_names.add(params[i])
            names = list(bound.arguments)
            dynamic = {k: v for k, v in bound.arguments.items() if k not in static_names}
            static = tuple((k, bound.arguments[k]) for k in names if k in static_names)

            def rebuild(dyn):
                merged = dict(bound.arguments)
                merged.update(dyn)
                b = inspect.BoundArguments(self._sig, merged)
                return b.args, b.kwargs
            return dynamic, static, rebuild
        # No signature (builtins, some C functions): positional indices are the names.
        dynamic = {f"arg{i}": a for i, a in enumerate(args) if i not in self.static_argnums}
        dynamic.update({k: v for k, v in kwargs.items() if k not in static_names})
        static = tuple((i, args[i]) for i in self.static_argnums if i < len(args)) + \
            tuple((k, kwargs[k]) for k in kwargs if k in static_names)

        def rebuild(dyn):
            a = [dyn.get(f"arg{i}", args[i]) for i in range(len(args))]
            kw = {k: dyn.get(k, v) for k, v in kwargs.items()}
            return tuple(a), kw
        return dynamic, static, rebuild

    def _flatten(self, dynamic):
        """(leaves, treedef, per leaf its argument's place in the call): flattening sorts
        the {name: value} dict, so the order of leaves is not the order of arguments."""
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(dynamic)
        leaves = []
        names = list(dynamic)
        positions = tuple(names.index(path[0].key) for path, _ in leaves_with_path)
        for path, leaf in leaves_with_path:
            if not _is_arraylike(leaf):
                where = jax.tree_util.keystr(path)
                raise TypeError(
                    f"graphopt.optimize({self.__name__}): argument {where} is a "
                    f"{type(leaf).__name__}, not an array; mark it static with "
                    f"static_argnames=(...) or pass an array")
            leaves.append(leaf)
        return leaves, treedef, positions

    def _key(self, leaves, treedef, static):
        try:
            hash(static)
        except TypeError:
            raise TypeError(f"graphopt.optimize({self.__name__}): static arguments must be "
                            f"hashable, got {[k for k, _ in static]}") from None
        return (treedef, tuple(_leaf_spec(x) for x in leaves), static)

    # ------------------------------------------------------------------ building
    def _build(self, args, kwargs) -> tuple[_Entry, list]:
        dynamic, static, rebuild = self._split(args, kwargs)
        leaves, treedef, positions = self._flatten(dynamic)
        key = self._key(leaves, treedef, static)
        entry = self._cache.get(key)
        if entry is not None:
            return entry, leaves

        def flat_fun(*flat):
            a, kw = rebuild(jax.tree_util.tree_unflatten(treedef, list(flat)))
            return self.fun(*a, **kw)

        specs = [jax.ShapeDtypeStruct(s, d, weak_type=w) for s, d, w in key[1]]
        t0 = time.perf_counter()
        try:
            original, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*specs)
        except GraphoptError:
            raise
        except Exception as exc:
            # Keep the user's exception type; say on top which graphopt call traced it.
            exc.add_note(f"graphopt.optimize({self.__name__}): tracing the function failed for "
                         f"inputs {[ir.aval_str(ir.aval_of(s)) for s in specs]}")
            raise
        trace_s = time.perf_counter() - t0
        out_tree = jax.tree_util.tree_structure(out_shape)
        ctx = PassContext(placement=placement_of(original), options=self.options,
                          platform=jax.default_backend(), arg_positions=positions)
        t0 = time.perf_counter()
        optimized, records = self.pipeline.run(original, ctx)
        pipe_s = time.perf_counter() - t0
        report = Report(name=self.__name__, placement=ctx.placement, original=original,
                        optimized=optimized, records=records, trace_seconds=trace_s,
                        pipeline_seconds=pipe_s, passes=self.pipeline.names)

        def run(*flat):
            return ir.eval_jaxpr(optimized, *flat)

        entry = _Entry(original, optimized, out_tree, report, jax.jit(run) if self.jit else run)
        # Shapes only: keeping the first call's arrays (or tracers) would pin them in memory.
        report.bind_functions(lambda *f: ir.eval_jaxpr(original, *f), run, specs)
        self._cache[key] = entry
        return entry, leaves

    # ------------------------------------------------------------------ public
    def _inner(self, *args, **kwargs):
        """Trace-time body: look up (or build) the rewritten program and evaluate it."""
        entry, leaves = self._build(args, kwargs)
        out = ir.eval_jaxpr(entry.optimized, *leaves)
        return jax.tree_util.tree_unflatten(entry.out_tree, out)

    def __call__(self, *args, **kwargs):
        if self.check:
            entry, leaves = self._build(args, kwargs)
            if not entry.checked:
                self._check(entry, leaves)
        try:
            # jax.jit's own dispatch caches per signature: no Python overhead per call.
            return self._call(*args, **kwargs)
        except (TypeError, ValueError):
            self._build(args, kwargs)  # raises a graphopt error naming a bad argument
            raise

    def _check(self, entry: _Entry, leaves) -> None:
        from . import testing
        concrete = [x for x in leaves]
        if any(ir.is_tracer(x) for x in leaves):
            # Under an outer transform: check on random inputs of the same types.
            concrete = testing.random_like([ir.aval_of(x) for x in leaves])
            entry.report.check_inputs = "random inputs (called under a transform)"
        else:
            entry.report.check_inputs = "the first call's inputs"
        errs = testing.compare_jaxprs(entry.original, entry.optimized, concrete)
        entry.report.check_errors = errs
        entry.checked = True
        bad = [f"{k}: max rel err {v['max_rel_err']:.3g}" for k, v in errs.items() if not v["ok"]]
        if bad:
            raise EquivalenceError(
                f"graphopt.optimize({self.__name__}): optimized program differs from the "
                f"original ({', '.join(bad)}); passes were {self.pipeline.names}")

    def jaxpr(self, *args, **kwargs) -> ir.ClosedJaxpr:
        """The optimized jaxpr for these arguments."""
        return self._build(args, kwargs)[0].optimized

    def original_jaxpr(self, *args, **kwargs) -> ir.ClosedJaxpr:
        """The jaxpr as traced, before any pass."""
        return self._build(args, kwargs)[0].original

    def report(self, *args, **kwargs) -> Report:
        """What every pass did for these arguments (text in a terminal, HTML in notebooks)."""
        return self._build(args, kwargs)[0].report

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower`` of the optimized program (flat arguments)."""
        entry, leaves = self._build(args, kwargs)
        return jax.jit(entry.run).lower(*leaves)

    def __repr__(self):
        return f"<graphopt.optimize({self.__name__}) passes={self.pipeline.names}>"


def optimize(fun: Callable | None = None, *, passes=None, check: bool = False,
             static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = (),
             jit: bool = True, max_rounds: int = 4, **options):
    """Rewrite ``fun`` with graphopt's passes; use as ``@optimize`` or ``@optimize(...)``.

    Args:
      passes: pass names, groups ("prune") or Pass objects; default: the default pipeline.
      check: compare outputs and gradients with the original on the first call per
        input signature and raise :class:`EquivalenceError` if they differ.
      static_argnums / static_argnames: arguments that are Python values, not arrays
        (hashed into the cache key, like ``jax.jit``).
      jit: wrap the optimized program in ``jax.jit`` (default True).
      **options: pass options, e.g. ``fold_max_bytes=...``.
    """
    if passes is not None:
        resolve(list(passes) if not isinstance(passes, str) else [passes])  # fail early on bad names
        if isinstance(passes, str):
            passes = [passes]
    kwargs = dict(passes=passes, check=check, static_argnums=static_argnums,
                  static_argnames=static_argnames, jit=jit, options=options, max_rounds=max_rounds)
    if fun is None:
        return lambda f: Optimized(f, **kwargs)
    return Optimized(fun, **kwargs)


def remat(fun: Callable | None = None, *, memory_budget, **options):
    """Rematerialize ``fun`` (a model or loss, before ``jax.grad``) under a memory budget.

    ``memory_budget``: bytes (int or "2GiB") of XLA temp memory for the differentiated
    program, or a float in (0, 1] as a fraction of its un-rematerialized temp memory.
    The returned function steers what AD saves (names plus a checkpoint policy).
    """
    if fun is None:
        return lambda f: remat(f, memory_budget=memory_budget, **options)
    from graphopt.transforms import remat as _remat
    return _remat.make_remat(fun, memory_budget=memory_budget, **options)


def optimize_jaxpr(cj: ir.ClosedJaxpr, passes=None, **options):
    """Run the pipeline on an already traced closed jaxpr: (optimized, records)."""
    pipe = Pipeline(passes if passes is not None else default_passes(), check=True)
    ctx = PassContext(placement=placement_of(cj), options=options, platform=jax.default_backend())
    return pipe.run(cj, ctx)


__all__ = ["optimize", "remat", "Optimized", "optimize_jaxpr", "default_passes", "registered_passes"]
