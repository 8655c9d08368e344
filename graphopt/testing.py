"""Equivalence checks for rewrites, for graphopt's tests and for users' own passes.

``assert_equivalent(f, g, *args)`` compares outputs and gradients of two functions;
``check_pass(p, f, *args, options=...)`` runs a pass on ``f``'s jaxpr, with the options
``graphopt.optimize`` takes, and asserts the invariants every pass keeps: well-typed, same
interface, same outputs and gradients, idempotent.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from . import ir
from .errors import EquivalenceError
from .interpreter import Stats
from .options import check_rtol, validate
from .passes import (PassContext, PassResult, check_interface, own_options, placement_of,
                     resolve)

# Default tolerances per dtype, relative to each array's magnitude. Exact rewrites keep
# float32 near 1e-6, but XLA's own fusion choices move gradients by a few 1e-6 between
# two compiles of equivalent programs, so float32 allows 1e-5.
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2,
        np.dtype(jnp.bfloat16): 2e-2, np.dtype(np.complex64): 1e-5,
        np.dtype(np.complex128): 1e-12}


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _as_wide(x) -> np.ndarray:
    """float64 (complex128 for complex values, so the imaginary part counts) or as is."""
    if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
        return np.asarray(x, dtype=np.complex128)
    return np.asarray(x, dtype=np.float64) if _is_float(x) else np.asarray(x)


def max_rel_error(a, b) -> float:
    """Largest |a-b| relative to the larger array's magnitude (max |x|), 0 for exact matches.

    Scaling by the array's magnitude rather than per element keeps float reassociation
    noise on near-zero elements (which XLA itself produces between jit and eager) from
    reading as a large error. NaNs in the same places and equal infinities match.
    """
    a, b = _as_wide(a), _as_wide(b)
    if a.shape != b.shape:
        return float("inf")
    if not np.issubdtype(a.dtype, np.inexact):
        return 0.0 if np.array_equal(a, b) else float("inf")
    if a.size == 0:
        return 0.0
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    same = np.isnan(a) | ((a == b) & np.isinf(a))
    if np.any(np.isinf(a) & ~same) or np.any(np.isinf(b) & ~same):
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf - inf where ``same`` masks it anyway
        diff = np.where(same, 0.0, np.abs(a - b))
    finite = np.where(same, 0.0, np.maximum(np.abs(a), np.abs(b)))
    scale = max(float(np.max(finite)), 1e-30)
    return float(np.max(diff)) / scale


def random_like(avals, seed: int = 0) -> list:
    """Random arrays of the given avals (normal floats, small non-negative ints, bools)."""
    with jax.ensure_compile_time_eval():  # concrete even when called under a jit trace
        return _random_like(avals, seed)


def _random_like(avals, seed):
    rng = np.random.default_rng(seed)
    out = []
    for a in avals:
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # typed PRNG keys
            keys = jax.random.split(jax.random.key(seed), max(1, int(np.prod(a.shape))))
            out.append(keys.reshape(a.shape) if a.shape else keys[0])
            continue
        dt = np.dtype(a.dtype)
        if np.issubdtype(dt, np.complexfloating):
            z = rng.standard_normal(a.shape) + 1j * rng.standard_normal(a.shape)
            out.append(jnp.asarray(z, dtype=a.dtype))
        elif np.issubdtype(dt, np.floating) or dt == jnp.bfloat16:
            out.append(jnp.asarray(rng.standard_normal(a.shape), dtype=a.dtype))
        elif np.issubdtype(dt, np.integer):
            out.append(jnp.asarray(rng.integers(0, 2, a.shape), dtype=a.dtype))
        elif dt == np.bool_:
            out.append(jnp.asarray(rng.integers(0, 2, a.shape).astype(bool)))
        else:
            out.append(jnp.zeros(a.shape, a.dtype))
    return out


def _float_positions(args) -> list[int]:
    return [i for i, x in enumerate(args) if _is_float(x)]


def _grads(fn: Callable, args, cot_seed: int = 1):
    """VJP of ``fn`` w.r.t. its float arguments against fixed random cotangents."""
    pos = _float_positions(args)
    if not pos:
        return []

    def f(*fl):
        full = list(args)
        for i, v in zip(pos, fl):
            full[i] = v
        outs = fn(*full)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [o for o in outs if _is_float(o)]

    outs, vjp = jax.vjp(f, *[args[i] for i in pos])
    if not outs:
        return []
    cots = random_like([ir.aval_of(o) for o in outs], seed=cot_seed)
    return list(vjp(cots))


def compare_fns(f: Callable, g: Callable, args: Sequence, grads: bool = True,
                rtol: float | None = None) -> dict:
    """{"outputs": {...}, "gradients": {...}} each with max_rel_err, ok."""
    # Called under an outer jit trace (optimize(check=True) inside jax.jit), concrete
    # inputs would otherwise be staged into that trace and never become numbers.
    with jax.ensure_compile_time_eval():
        return _compare_fns(f, g, args, grads, rtol)


def _compare_fns(f, g, args, grads, rtol) -> dict:
    res = {}
    fo = jax.tree_util.tree_leaves(f(*args))
    go = jax.tree_util.tree_leaves(g(*args))
    res["outputs"] = _summ(fo, go, rtol)
    if grads:
        try:
            gf = _grads(f, list(args))
        except Exception as exc:  # e.g. a while loop: the original has no gradient to compare
            res["gradients"] = {"max_rel_err": 0.0, "ok": True,
                                "skipped": f"original not reverse-differentiable: {exc}"}
            return res
        res["gradients"] = _summ(gf, _grads(g, list(args)), rtol)
    return res


def _summ(xs, ys, rtol) -> dict:
    if len(xs) != len(ys):
        return {"max_rel_err": float("inf"), "ok": False}
    worst, ok = 0.0, True
    for x, y in zip(xs, ys):
        err = max_rel_error(x, y)
        tol = rtol if rtol is not None else RTOL.get(np.dtype(jnp.result_type(x)), 0.0)
        worst = max(worst, err)
        ok &= err <= tol
    return {"max_rel_err": worst, "ok": bool(ok)}


def compare_jaxprs(a: ir.ClosedJaxpr, b: ir.ClosedJaxpr, args, grads: bool = True,
                   rtol: float | None = None) -> dict:
    return compare_fns(lambda *x: ir.eval_jaxpr(a, *x), lambda *x: ir.eval_jaxpr(b, *x),
                       args, grads, rtol)


def assert_equivalent(f: Callable, g: Callable, *args, grads: bool = True,
                      rtol: float | None = None) -> dict:
    """Raise :class:`EquivalenceError` unless f and g agree on outputs (and gradients)."""
    flat, tree = jax.tree_util.tree_flatten(args)

    def flat_fn(fn):
        return lambda *xs: jax.tree_util.tree_leaves(fn(*jax.tree_util.tree_unflatten(tree, list(xs))))

    res = compare_fns(flat_fn(f), flat_fn(g), flat, grads, rtol)
    for k, v in res.items():
        if not v["ok"]:
            raise EquivalenceError(f"{k} differ: max relative error {v['max_rel_err']:.3g}")
    return res


@dataclasses.dataclass
class CheckedPass(PassResult):
    """:class:`PassResult` of :func:`check_pass`, plus the jaxpr it started from and the
    comparison it made (``{"outputs": ..., "gradients": ...}``, empty when unchanged)."""
    before: ir.ClosedJaxpr | None = None
    comparison: dict = dataclasses.field(default_factory=dict)


def _vjp_outs(cj, xs, pos, cots):
    """Outputs of ``cj`` and its VJP w.r.t. the float inputs ``pos`` (float outputs only)."""
    def f(*fl):
        full = list(xs)
        for i, v in zip(pos, fl):
            full[i] = v
        return [o for o in ir.eval_jaxpr(cj, *full) if _is_float(o)]
    outs = ir.eval_jaxpr(cj, *xs)
    if not pos or not cots:
        return outs, []
    _, vjp = jax.vjp(f, *[xs[i] for i in pos])
    return outs, list(vjp(list(cots)))


def _compare_compiled(a, b, flat, grads: bool, rtol) -> dict:
    """compare_jaxprs, with both programs and their VJPs in one jit: one compile, where
    eager evaluation would compile every equation on its own."""
    pos = _float_positions(flat) if grads else []
    cots = random_like([v for v in a.out_avals if _is_float(v)], seed=1) if pos else []

    def both(xs, cs):
        return [_vjp_outs(j, xs, pos, cs) for j in (a, b)]

    try:
        (oa, ga), (ob, gb) = jax.jit(both)(list(flat), cots)
    except Exception as exc:  # e.g. a while loop: the original has no gradient to compare
        try:
            if pos:
                jax.jit(lambda xs, cs: _vjp_outs(a, xs, pos, cs))(list(flat), cots)
        except Exception:
            pos = []
            (oa, _), (ob, _) = jax.jit(both)(list(flat), cots)
            return {"outputs": _summ(oa, ob, rtol),
                    "gradients": {"max_rel_err": 0.0, "ok": True,
                                  "skipped": f"original not reverse-differentiable: {exc}"}}
        raise  # the original differentiates: the rewrite's failure is the pass's
    res = {"outputs": _summ(oa, ob, rtol)}
    if pos:
        res["gradients"] = _summ(ga, gb, rtol)
    return res


def check_pass(p, fn: Callable | ir.ClosedJaxpr, *args, ctx: PassContext | None = None,
               rtol: float | None = None, grads: bool = True, expect_change: bool = True,
               options: dict | None = None, jit: bool = True) -> CheckedPass:
    """Run pass ``p`` on ``fn``'s jaxpr and assert every invariant; returns a :class:`CheckedPass`.

    ``fn`` is a function of ``args`` (traced here) or a closed jaxpr taking the flat ``args``.

    ``options`` are the keyword options :func:`graphopt.optimize` takes (checked the same
    way: a misspelt or bad one raises :class:`~graphopt.OptionError`), handed to the pass
    through its :class:`PassContext` (merged over ``ctx.options`` when both are given); an
    option that declares a tolerance (``precision``) sets the default ``rtol``. ``jit``
    compares both programs and their VJPs in one compile; ``jit=False`` evaluates them
    equation by equation, cheaper for many tiny programs whose primitives repeat.

    Invariants: ``check_jaxpr`` holds, inputs/outputs keep their avals, a pass that says it
    changed nothing returns its input, outputs and gradients match the original, a second
    run changes nothing (idempotence), and, when ``expect_change``, something changed.
    """
    passes = resolve(p)
    flat, tree = jax.tree_util.tree_flatten(args)
    if isinstance(fn, ir.ClosedJaxpr):  # hand-built: programs JAX's own tracing never emits
        cj = fn
    else:
        cj = jax.make_jaxpr(lambda *xs: fn(*jax.tree_util.tree_unflatten(tree, list(xs))))(*flat)
    names = [q.name for q in passes]
    ctx = ctx or PassContext(placement=placement_of(cj))
    checked = validate(dict(options), f"check_pass({', '.join(names)})") if options else {}
    if checked:
        ctx = dataclasses.replace(ctx, options={**ctx.options, **checked})
    if rtol is None:  # a configured pass's own settings (graphopt.passes.<name>) count too
        rtol = check_rtol({**checked, **own_options(passes)})
    cur, changed, stats = cj, False, Stats()
    for q in passes:
        res = q(cur, ctx)
        ir.check(res.jaxpr)
        check_interface(q.name, cur, res.jaxpr)
        if res.changed == (res.jaxpr is cur):  # an unchanged pass returns its input
            said, did = ("something", "its input") if res.changed else ("nothing", "a new jaxpr")
            raise AssertionError(f"pass {q.name!r} says it changed {said} but returned {did}")
        changed |= res.changed
        stats.merge(res.stats)  # callers assert which rules fired
        cur = res.jaxpr
    if expect_change and not changed:
        raise AssertionError(f"passes {names} changed nothing")
    again, again_changed, again_stats = cur, False, Stats()
    for q in passes:
        r2 = q(again, ctx)
        again, again_changed = r2.jaxpr, again_changed or r2.changed
        again_stats.merge(r2.stats)
    if again_changed or (again is not cur and str(again) != str(cur)):
        raise AssertionError(f"passes {names} are not idempotent: a second run fired "
                             f"{dict(again_stats.hits)}")
    compare = _compare_compiled if jit else compare_jaxprs
    res_cmp = {} if cur is cj else compare(cj, cur, flat, grads, rtol)
    for k, v in res_cmp.items():
        if not v["ok"]:
            raise EquivalenceError(f"{k} differ after {names}: "
                                   f"max relative error {v['max_rel_err']:.3g}")
    return CheckedPass(cur, changed, stats, before=cj, comparison=res_cmp)


__all__ = ["CheckedPass", "assert_equivalent", "check_pass", "compare_fns", "compare_jaxprs",
           "max_rel_error", "random_like"]
