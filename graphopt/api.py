"""The user-facing entry points: ``optimize`` and the default pipeline.

``optimize`` feels like ``jax.jit``: it works with and without arguments, honours
static arguments, caches the rewritten program per abstract input signature, jits by
default, and returns a function that composes with ``jax.grad``, ``jax.vmap`` and
``jax.jit`` inside or outside. flax NNX and equinox arguments are converted around the call
(``graphopt.frameworks``). This is the only core module that imports
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

from . import donation, frameworks, ir, regrad, sharding
from .errors import EquivalenceError, GraphoptError, OptionError
from .options import check_rtol, implied_passes, validate
from .passes import (Pass, Pipeline, PassContext, own_options, placement_of, registered_passes,
                     resolve)
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
    plan: donation.Plan | None = None   # what is donated (None: donation is off)
    donated: Callable | None = None     # jitted, donating; takes the inputs in `order`
    order: tuple | None = None          # (inputs, outputs) as the donating program takes them

    def call_donated(self, leaves):
        res = self.donated(*[leaves[k] for k in self.order[0]])
        out = [None] * len(res)
        for t, j in enumerate(self.order[1]):
            out[j] = res[t]
        return out


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
                 jit: bool = True, options: dict | None = None, max_rounds: int = 4,
                 donate=None, donate_argnums: int | Sequence[int] = (),
                 donate_argnames: str | Sequence[str] = ()):
        if not callable(fun):
            raise TypeError(f"graphopt.optimize expects a function, got {type(fun).__name__}")
        self.fun = fun
        functools.update_wrapper(self, fun)
        if not hasattr(self, "__name__"):  # functools.partial and callable objects have none
            self.__name__ = getattr(type(fun), "__name__", "function")
        self.options = validate(dict(options or {}), f"graphopt.optimize({self.__name__})")
        self.pass_specs = _pass_list(passes) if passes is not None else default_passes()
        # e.g. a memory budget asks for rematerialization after the other passes
        self.pass_specs += implied_passes(self.options, [p.name for p in resolve(self.pass_specs)])
        self.pipeline = Pipeline(self.pass_specs, check=True, max_rounds=max_rounds)
        # options given to graphopt.passes.<name>(...) count too (budget, check tolerance)
        self._settings = {**self.options, **own_options(self.pipeline.passes)}
        remat_only = sorted(k for k in self._settings if k.startswith("remat_"))
        if remat_only and self._settings.get("memory_budget") is None:
            raise OptionError(f"graphopt.optimize({self.__name__}): {', '.join(remat_only)} "
                              "given without memory_budget, so no rematerialization would run")
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
        if self._sig is not None:
            # a static argument is static however it is passed (jax.jit infers this only
            # when one of the two is given): hand jax.jit both forms
            params = list(self._sig.parameters.values())
            self.static_argnames += tuple(params[i].name for i in self.static_argnums
                                          if i < len(params) and params[i].name
                                          not in self.static_argnames)
            self.static_argnums += tuple(
                i for i, p in enumerate(params) if p.name in self.static_argnames
                and p.kind is p.POSITIONAL_OR_KEYWORD and i not in self.static_argnums)
        self.donate, nums, names = donation.check_option(
            donate, donate_argnums, donate_argnames, jit, f"graphopt.optimize({self.__name__})")
        self._donate_names = donation.argnames(self._sig, self.static_argnums,
                                               self.static_argnames, nums, names, self.__name__)
        self._cache: dict = {}
        # jax.jit must see fun's signature to map static args given by name or position.
        inner = functools.wraps(fun)(lambda *a, **k: self._inner(*a, **k))
        def make():
            return jax.jit(inner, static_argnums=self.static_argnums or None,
                           static_argnames=self.static_argnames or None)
        self._call = make() if jit else self._inner
        # a remat budget is per device: plan once per placement of the inputs
        self._placed = (sharding.PerPlacement(make)
                        if jit and self._settings.get("memory_budget") is not None else None)

    @property
    def donating(self) -> bool:
        return self.donate == donation.AUTO or bool(self._donate_names)

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
        # placement matters to per-device remat plans only (jax.jit places the rest)
        placed = sharding.of(leaves) if self._placed is not None else None
        return (treedef, tuple(_leaf_spec(x) for x in leaves), static, placed,
                sharding.varying(leaves))

    # ------------------------------------------------------------------ building
    def _leaves(self, args, kwargs):
        dynamic, static, rebuild = self._split(args, kwargs)
        prep = frameworks.prepare(dynamic, self.__name__)
        if prep is not None:  # nnx objects / equinox modules as slots: state and static parts
            dynamic = prep.dynamic
        return (dynamic, static, rebuild) + self._flatten(dynamic)

    def _build(self, args, kwargs) -> tuple[_Entry, list]:
        dynamic, static, rebuild, leaves, treedef, positions = self._leaves(args, kwargs)
        key = self._key(leaves, treedef, static)
        entry = self._cache.get(key)
        if entry is not None:
            return entry, leaves

        def flat_fun(*flat):
            a, kw = rebuild(jax.tree_util.tree_unflatten(treedef, list(flat)))
            return frameworks.call(self.fun, a, kw, self.__name__)

        specs = sharding.trace_specs([jax.ShapeDtypeStruct(s, d, weak_type=w)
                                      for s, d, w in key[1]], leaves, key[4], self.__name__)
        t0 = time.perf_counter()
        try:
            # the losses the step differentiates are fused before AD (graphopt.regrad)
            original, traced, out_shape, pre_ad = regrad.trace(flat_fun, specs,
                                                               self.pass_specs, self.options)
        except GraphoptError:
            raise
        except Exception as exc:
            # Keep the user's exception type; say on top which graphopt call traced it.
            exc.add_note(f"graphopt.optimize({self.__name__}): tracing the function failed for "
                         f"inputs {[ir.aval_str(ir.aval_of(s)) for s in specs]}")
            raise
        trace_s = time.perf_counter() - t0
        out_tree = jax.tree_util.tree_structure(out_shape)
        names = list(dynamic)  # per argument place, its name: the remat note names the batch
        ctx = PassContext(placement=placement_of(traced), options=self.options,
                          platform=jax.default_backend(), arg_positions=positions,
                          arg_names=tuple(names), in_shardings=key[3])
        t0 = time.perf_counter()
        optimized, records = self.pipeline.run(traced, ctx)
        pipe_s = time.perf_counter() - t0
        records = ([pre_ad] if pre_ad is not None else []) + records
        report = Report(name=self.__name__, placement=ctx.placement, original=original,
                        optimized=optimized, records=records, trace_seconds=trace_s,
                        pipeline_seconds=pipe_s, passes=self.pipeline.names)

        def run(*flat):
            return ir.eval_jaxpr(optimized, *flat)

        entry = _Entry(original, optimized, out_tree, report, jax.jit(run) if self.jit else run)
        requested = None  # auto: donation.plan picks; explicit: the named arguments' leaves
        if self.donating and self.donate != donation.AUTO:
            requested = [k for k, pos in enumerate(positions) if names[pos] in self._donate_names]
        donation.attach(entry, dynamic, leaves, requested,
                        None if not self.donating else ("explicit" if requested is not None else "auto"))
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
        prep = None
        if frameworks.active():  # flax NNX / equinox loaded: their objects become slots
            dynamic, _, rebuild = self._split(args, kwargs)
            prep = frameworks.prepare(dynamic, self.__name__)
            if prep is not None:
                args, kwargs = rebuild(prep.dynamic)
        out = self._call_prepared(args, kwargs)
        if prep is not None:
            return prep.finish(out)  # nnx state written back to the caller's objects
        return frameworks.unwrap_outputs(out)

    def _call_prepared(self, args, kwargs):
        if self.check:
            entry, leaves = self._build(args, kwargs)
            if not entry.checked:
                self._check(entry, leaves)
        if self.donating:
            entry, leaves = self._build(args, kwargs)
            if entry.donated is not None and not any(ir.is_tracer(x) for x in leaves) \
                    and donation.may_donate(entry, leaves):
                out = entry.call_donated(leaves)
                return jax.tree_util.tree_unflatten(entry.out_tree, out)
        try:
            if self._placed is not None:
                return self._placed(self._leaves(args, kwargs)[3], *args, **kwargs)
            # jax.jit's own dispatch caches per signature: no Python overhead per call.
            return self._call(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, GraphoptError):  # already names the problem: do not rebuild
                raise
            entry, _ = self._build(args, kwargs)  # raises a graphopt error naming a bad argument
            made = _passes_adding(entry.report.records, "custom_vjp_call")
            if "forward-mode" in str(exc) and made:
                exc.add_note(
                    f"graphopt.optimize({self.__name__}): {', '.join(made)} rewrote part of the "
                    "program as jax.custom_vjp functions (a fused kernel's own backward, remat "
                    "segments), which JAX cannot differentiate in forward mode (jax.jvp, "
                    "jacfwd); for forward mode optimize without them (passes=..., no "
                    "memory_budget)")
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
        # A post-AD step's outputs hold the gradients it computes; its own derivatives are
        # second derivatives, which an adaptive optimizer (Adam's g/sqrt(v)) makes
        # ill-conditioned enough that float32 rounding of a fused kernel shows: not compared.
        first_order = entry.report.placement != "post-AD"
        if not first_order:
            entry.report.check_inputs += ("; outputs only (a post-AD step: its outputs are its "
                                          "gradients' results, its own derivatives not compared)")
        errs = testing.compare_fns(_keys_as_data(entry.original), _keys_as_data(entry.optimized),
                                   concrete, grads=first_order, rtol=check_rtol(self._settings))
        entry.report.check_errors = errs
        entry.checked = True
        bad = [f"{k}: max rel err {v['max_rel_err']:.3g}" for k, v in errs.items() if not v["ok"]]
        if bad:
            from .bisect import first_differing_pass
            # name the first pass whose output differs, and the equation where it departs
            culprit = first_differing_pass(entry.original, entry.report.records, concrete)
            raise EquivalenceError(
                f"graphopt.optimize({self.__name__}): optimized program differs from the "
                f"original ({', '.join(bad)}); passes were {self.pipeline.names}"
                + (f"\n{culprit}" if culprit is not None else ""))

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
        """``jax.jit(...).lower`` of the program that runs (flat arguments), donation
        included: ``.compile().memory_analysis().alias_size_in_bytes`` shows the donated
        bytes. A donating program takes its flat inputs donated-first and returns the
        outputs that reuse them first (``jax.jit`` pairs donated inputs with outputs in
        order)."""
        entry, leaves = self._build(args, kwargs)
        if self.donating and entry.donated is not None:
            return entry.donated.lower(*[leaves[k] for k in entry.order[0]])
        return jax.jit(entry.run).lower(*leaves)

    def __repr__(self):
        return f"<graphopt.optimize({self.__name__}) passes={self.pipeline.names}>"


def _keys_as_data(cj: ir.ClosedJaxpr) -> Callable:
    """The program as a function whose PRNG-key outputs (nnx RNG state) are their raw
    data, which the comparison can read as numbers."""
    def run(*args):
        return [jax.random.key_data(o) if jax.dtypes.issubdtype(o.dtype, jax.dtypes.prng_key)
                else o for o in ir.eval_jaxpr(cj, *args)]
    return run


def _passes_adding(records, primitive: str) -> list[str]:
    """Names of the passes whose output holds more ``primitive`` equations than their input."""
    return list(dict.fromkeys(
        r.name for r in records if r.changed and ir.primitive_counts(r.after).get(primitive, 0)
        > ir.primitive_counts(r.before).get(primitive, 0)))


def _pass_list(passes) -> list:
    """``passes`` as a list, its names checked now rather than at the first call."""
    if isinstance(passes, (str, Pass)) or (callable(passes) and not isinstance(passes, type)):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise OptionError(f"graphopt.optimize: passes must be a list of pass names, Pass "
                          f"objects or functions, got {type(passes).__name__} {passes!r}; "
                          f"registered passes: {', '.join(registered_passes())}")
    resolve(list(passes))
    return list(passes)


def optimize(fun: Callable | None = None, *, passes=None, check: bool = False,
             static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = (),
             jit: bool = True, max_rounds: int = 4, donate=None,
             donate_argnums: int | Sequence[int] = (), donate_argnames: str | Sequence[str] = (),
             **options):
    """Rewrite ``fun`` with graphopt's passes; use as ``@optimize`` or ``@optimize(...)``.

    Args:
      passes: pass names, groups ("prune") or Pass objects; default: the default pipeline.
      check: compare outputs and gradients with the original on the first call per
        input signature and raise :class:`EquivalenceError` if they differ.
      static_argnums / static_argnames: arguments that are Python values, not arrays
        (hashed into the cache key, like ``jax.jit``).
      jit: wrap the optimized program in ``jax.jit`` (default True).
      donate: ``"auto"`` donates every input leaf an output of the same shape and dtype
        replaces (parameters, optimizer state); without it the report says what donating
        would save. donate_argnums / donate_argnames: donate these arguments, as
        ``jax.jit`` does. A donated array is deleted by the call: reusing it raises JAX's
        own error.
      **options: pass options, e.g. ``fold_max_bytes=...``.

    flax NNX objects and equinox modules are taken as ``nnx.jit`` and ``eqx.filter_jit``
    take them: NNX state mutated inside comes back to the caller's objects, an equinox
    module's non-array leaves are static (``graphopt.frameworks``).
    """
    if passes is not None:
        passes = _pass_list(passes)
    kwargs = dict(passes=passes, check=check, static_argnums=static_argnums,
                  static_argnames=static_argnames, jit=jit, options=options, max_rounds=max_rounds,
                  donate=donate, donate_argnums=donate_argnums, donate_argnames=donate_argnames)
    if fun is None:
        return lambda f: Optimized(f, **kwargs)
    return Optimized(fun, **kwargs)


class Rematted(Optimized):
    """``graphopt.remat``: :class:`Optimized` running the remat pass alone."""

    def info(self, *args, **kwargs) -> dict:
        """What the remat pass chose for these arguments: placement, solver, bytes
        (``base_bytes``, ``budget_bytes``, ``bytes``), ``flops`` recomputed, notes."""
        for rec in self.report(*args, **kwargs).records:
            if rec.name == "remat" and rec.stats.details:
                return dict(rec.stats.details)
        raise GraphoptError(f"graphopt.remat({self.__name__}): the remat pass recorded "
                            "nothing for these arguments")


# graphopt.remat's former option names, read as the optimize options they always meant
_REMAT_ALIASES = {"solver": "remat_solver", "max_cuts": "remat_max_cuts",
                  "time_limit": "remat_time_limit"}


def remat(fun: Callable | None = None, *, memory_budget, static_argnums=(), static_argnames=(),
          jit: bool = True, **options):
    """Rematerialize ``fun`` under a memory budget; the same road as
    ``optimize(fun, passes=["remat"], memory_budget=...)``.

    On a model or loss (``jax.grad`` outside) it steers what AD saves; on a whole
    training step it rewrites the step's schedule. ``memory_budget``: bytes (int or
    "2GiB") of XLA temp memory of the differentiated program, or a float in (0, 1] as a
    fraction of its un-rematerialized temp memory. Static arguments as in ``jax.jit``.
    """
    options = {_REMAT_ALIASES.get(k, k): v for k, v in options.items()}
    kwargs = dict(passes=["remat"], static_argnums=static_argnums,
                  static_argnames=static_argnames, jit=jit,
                  options={"memory_budget": memory_budget, **options})
    if fun is None:
        return lambda f: Rematted(f, **kwargs)
    return Rematted(fun, **kwargs)


def optimize_jaxpr(cj: ir.ClosedJaxpr, passes=None, **options):
    """Run the pipeline on an already traced closed jaxpr: (optimized, records)."""
    pipe = Pipeline(passes if passes is not None else default_passes(), check=True)
    ctx = PassContext(placement=placement_of(cj), options=validate(options, "graphopt.optimize_jaxpr"),
                      platform=jax.default_backend())
    return pipe.run(cj, ctx)


__all__ = ["optimize", "remat", "Optimized", "Rematted", "optimize_jaxpr", "default_passes",
           "registered_passes"]
