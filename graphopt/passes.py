"""Passes, their results, and the pipeline that runs them.

A pass maps a closed jaxpr to a :class:`PassResult` (new jaxpr, whether it changed,
what it did). A :class:`Pipeline` runs passes in order, optionally to a fixpoint, checks
the jaxpr after each one (``check_jaxpr`` plus the interface: same input and output
avals), records a :class:`PassRecord` per pass run, and turns any failure into a
:class:`PassError` that names the pass (and, from the interpreter, the equation).
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import time
from collections.abc import Callable, Sequence

from . import ir
from .errors import GraphoptError, OptionError, PassError
from .interpreter import Stats
from .options import OPTIONS, suggest, validate


@dataclasses.dataclass
class PassContext:
    """What a pass may know besides the jaxpr."""
    placement: str = "pre-AD"              # "pre-AD" or "post-AD" (see placement_of)
    options: dict = dataclasses.field(default_factory=dict)
    example_args: tuple | None = None      # flat concrete args, when known
    platform: str = "cpu"
    arg_positions: tuple | None = None     # per flat input: its argument's place in the call
    arg_names: tuple | None = None         # per argument place (arg_positions' values), its name
    in_shardings: tuple | None = None      # per flat input: its sharding over several devices, or None

    def option(self, name: str, default=None):
        return self.options.get(name, default)


@dataclasses.dataclass
class PassResult:
    jaxpr: ir.ClosedJaxpr
    changed: bool
    stats: Stats = dataclasses.field(default_factory=Stats)


PassFn = Callable[[ir.ClosedJaxpr, PassContext], PassResult]


@dataclasses.dataclass
class Pass:
    """A named jaxpr → jaxpr transformation."""
    name: str
    fn: PassFn
    description: str = ""
    family: str = ""
    options: dict = dataclasses.field(default_factory=dict)  # this pass's own (configure)
    # passes whose changes never give this one work: a pipeline round skips it when only
    # they changed the program since it last ran (dce's removals leave live equations be)
    unaffected_by: frozenset = frozenset()

    def __call__(self, cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        if self.options:  # its own settings win over the pipeline's
            ctx = dataclasses.replace(ctx, options={**ctx.options, **self.options})
        return self.fn(cj, ctx)


@dataclasses.dataclass
class PassRecord:
    """One run of one pass inside a pipeline."""
    name: str
    round: int
    before: ir.ClosedJaxpr
    after: ir.ClosedJaxpr
    changed: bool
    stats: Stats
    seconds: float

    @property
    def eqns_before(self) -> int:
        return ir.count_eqns(self.before)

    @property
    def eqns_after(self) -> int:
        return ir.count_eqns(self.after)


_REGISTRY: dict[str, Pass | list[str]] = {}


def register_pass(p: Pass) -> Pass:
    _REGISTRY[p.name] = p
    return p


def register_group(name: str, members: Sequence[str]) -> None:
    """A name that stands for several passes in order (e.g. 'prune')."""
    _REGISTRY[name] = list(members)


def registered_passes() -> list[str]:
    return sorted(_REGISTRY)


def resolve(spec: str | Pass | Callable | Sequence) -> list[Pass]:
    """Turn names, groups, Pass objects or bare functions into a flat pass list."""
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, str):
        entry = _REGISTRY.get(spec)
        if entry is None:
            raise ValueError(f"unknown pass {spec!r}; valid passes: {', '.join(registered_passes())}")
        if isinstance(entry, Pass):
            return [entry]
        return [p for m in entry for p in resolve(m)]
    if callable(spec):
        return [Pass(getattr(spec, "__name__", "custom"), spec)]
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in resolve(s)]
    raise TypeError(f"a pass is a name, a Pass, or a function (jaxpr, ctx) -> PassResult; got {spec!r}")


def _members(name: str) -> list[str]:
    entry = _REGISTRY.get(name)
    return [name] + ([m for s in entry for m in _members(s)] if isinstance(entry, list) else [])


def options_of(name: str) -> list[str]:
    """The options pass (or group) ``name`` reads, from the one options table."""
    members = set(_members(name))
    return sorted(k for k, o in OPTIONS.items() if o.pass_name in members)


def configure(name: str, **options) -> list[Pass]:
    """Pass (or group) ``name`` with its own settings, checked now: what
    ``graphopt.passes.<name>(**options)`` returns, e.g. ``passes=[passes.prune(
    fold_max_bytes="64KiB"), passes.remat(memory_budget="2GiB", remat_solver="milp")]``.
    The options are the ones ``graphopt.optimize`` takes, under the same names; one this
    pass does not read is an :class:`OptionError` naming those it does."""
    if name not in _REGISTRY:
        raise OptionError(f"unknown pass {name!r}; valid passes: {', '.join(registered_passes())}")
    valid = options_of(name)
    foreign = sorted(set(options) - set(valid))
    if foreign:
        raise OptionError(f"pass {name!r} does not read {', '.join(map(repr, foreign))}"
                          f"{suggest(foreign[0], valid)}; it reads: "
                          f"{', '.join(valid) or 'no options'}")
    checked = validate(options, f"graphopt.passes.{name}")
    return [dataclasses.replace(p, options={**p.options, **checked}) for p in resolve(name)]


def own_options(passes: Sequence[Pass]) -> dict:
    """The settings the passes carry themselves (``graphopt.passes.<name>(...)``), merged."""
    return {k: v for p in passes for k, v in p.options.items()}


def _factory(name: str) -> Callable[..., list[Pass]]:
    def make(**options):  # None: not given (the signature's default)
        return configure(name, **{k: v for k, v in options.items() if v is not None})
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"Pass {name!r} with its own settings:\n" + "\n".join(
        f"  {k}: {OPTIONS[k].doc}" for k in options_of(name))
    make.__signature__ = inspect.Signature([inspect.Parameter(
        k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in options_of(name)])
    return make


def __getattr__(name: str):
    """``graphopt.passes.prune``, ``graphopt.passes.remat``, ...: a factory per registered pass."""
    if name in _REGISTRY:
        return _factory(name)
    raise AttributeError(f"module 'graphopt.passes' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_REGISTRY))


def placement_of(cj: ir.ClosedJaxpr) -> str:
    """'post-AD' if the jaxpr already holds a backward pass (transposed equations)."""
    for e, _, _ in ir.walk_eqns(cj):
        ns = ir.name_stack(e)
        if "transpose(" in ns:
            return "post-AD"
    return "pre-AD"


def check_interface(name: str, before: ir.ClosedJaxpr, after: ir.ClosedJaxpr) -> None:
    """A pass keeps input and output avals (shape, dtype, weak type)."""
    bi, ai = before.in_avals, after.in_avals
    bo, ao = before.out_avals, after.out_avals
    if len(bi) != len(ai) or not all(ir.same_aval(a, b) for a, b in zip(bi, ai)):
        raise PassError(f"pass {name!r} changed the inputs: {bi} -> {ai}")
    if len(bo) != len(ao) or not all(ir.same_aval(a, b) for a, b in zip(bo, ao)):
        raise PassError(f"pass {name!r} changed the outputs: "
                        f"{[ir.aval_str(a) for a in bo]} -> {[ir.aval_str(a) for a in ao]}")


def full_checks() -> bool:
    """Whether every pass's output gets the full ``check_jaxpr`` (types of every equation),
    as JAX checks its own jaxprs under ``jax_enable_checks``: on in graphopt's tests, with
    ``GRAPHOPT_CHECK_JAXPR=1`` or ``jax.config.update("jax_enable_checks", True)``. It is
    most of the pipeline's time on a large step, so it is off by default; the interface
    check (same input and output avals) always runs."""
    import jax  # a config read only; no JAX internals here
    return os.environ.get("GRAPHOPT_CHECK_JAXPR", "0") not in ("", "0") \
        or bool(jax.config.jax_enable_checks)


class Pipeline:
    """Ordered passes; rounds repeat until nothing changes when ``fixpoint``.

    ``check``: True checks each changed jaxpr's interface, and its types too when
    :func:`full_checks` is on; "full" always checks types; False checks nothing."""

    def __init__(self, passes: Sequence, *, check: bool | str = True, fixpoint: bool = True,
                 max_rounds: int = 4):
        self.passes = resolve(list(passes))
        self.check = check
        self.fixpoint = fixpoint
        self.max_rounds = max_rounds

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, cj: ir.ClosedJaxpr, ctx: PassContext | None = None):
        """Returns (optimized closed jaxpr, list of PassRecord)."""
        # Passes allocate many short-lived objects over a large, long-lived jaxpr heap:
        # cyclic GC sweeps of that heap would dominate the run, so pause it meanwhile.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(cj, ctx)
        finally:
            if was_enabled:
                gc.enable()

    def _run(self, cj: ir.ClosedJaxpr, ctx: PassContext | None):
        ctx = ctx if ctx is not None else PassContext(placement=placement_of(cj))
        records: list[PassRecord] = []
        # Per pass, the passes that changed the program since it last ran (None: it has not
        # run). Passes are deterministic and idempotent (testing.check_pass asserts it), so
        # one whose program only its own run, or passes it is unaffected by, changed since
        # cannot change anything now.
        since: list = [None] * len(self.passes)
        full = self.check == "full" or (self.check and full_checks())
        for rnd in range(self.max_rounds):
            any_changed = False
            for k, p in enumerate(self.passes):
                if since[k] is not None and since[k] <= p.unaffected_by:
                    continue
                t0 = time.perf_counter()
                try:
                    res = p(cj, ctx)
                except GraphoptError:
                    raise
                except Exception as exc:
                    raise PassError(f"pass {p.name!r} failed: {type(exc).__name__}: {exc}") from exc
                dt = time.perf_counter() - t0
                if self.check and res.changed:
                    if full:
                        try:
                            ir.check(res.jaxpr)
                        except Exception as exc:
                            raise PassError(f"pass {p.name!r} produced an ill-typed jaxpr: "
                                            f"{exc}") from exc
                    check_interface(p.name, cj, res.jaxpr)
                records.append(PassRecord(p.name, rnd, cj, res.jaxpr, res.changed, res.stats, dt))
                any_changed |= res.changed
                since = [s | {p.name} if res.changed and s is not None else s for s in since]
                since[k] = frozenset()
                cj = res.jaxpr
            if not (self.fixpoint and any_changed):
                break
        return cj, records


__all__ = ["Pass", "PassResult", "PassContext", "PassRecord", "Pipeline", "PassError",
           "GraphoptError", "register_pass", "register_group", "registered_passes",
           "resolve", "placement_of", "check_interface", "full_checks", "configure",
           "options_of", "own_options"]
