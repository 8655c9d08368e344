"""Differential fuzzer: random programs (:mod:`graphopt.fuzz_programs`) through
``graphopt.optimize`` against the originals, on outputs, ``jax.vjp`` and ``jax.jvp``:
integers and booleans exactly, floats under :data:`TOLERANCE`, NaNs in the same places. A
budget the remat pass refuses is no failure (checked again at the floor it names); any
other exception from graphopt is a crash. Failures are shrunk (:func:`shrink`) and written
as regression tests (:func:`to_test`) calling :func:`regression` (all three in
:mod:`graphopt.fuzz_shrink`). docs/reliability.md says what is covered and how.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import time

import numpy as np

import optax

import jax
import jax.numpy as jnp

import graphopt

from . import fuzz_programs as fp, ir
from .errors import GraphoptError
from .fuzz_programs import Input, Program

# dtype -> (rtol, atol): |a - b| <= atol + rtol * max|a| for every element, the max over
# the array's finite elements (reassociated sums near zero judged at the array's scale).
TOLERANCE = {"float64": (1e-12, 1e-14), "float32": (1e-5, 1e-6), "float16": (1e-2, 1e-3),
             "bfloat16": (2e-2, 1e-2)}
_FAST = {"xla_backend_optimization_level": 0}
NUDGE_ULPS, NUDGE_NEAR = 4, 100  # :func:`_nudged`: input change, largest difference it excuses
_FLOOR = re.compile(r"smallest feasible budget is (\d+) bytes")


# ----------------------------------------------------------------------- the oracle
def mismatch(a, b, truth=None, near=None, coarse=None) -> str | None:
    """Why ``b`` differs from ``a`` beyond :data:`TOLERANCE`, or None. With ``truth`` (``a``'s
    program in float64, or at nudged inputs), float values within ten times ``a``'s own
    distance from it also pass; with ``near``, only a difference under ``near`` times the
    tolerance may pass that way. ``coarse``: the coarsest float dtype the program computes
    in; a finer float (a float32 sum of bfloat16 values) is judged at its tolerance."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{b.dtype}{list(b.shape)} where {a.dtype}{list(a.shape)} was expected"
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        bad = a != b
        return bad.any() and f"{int(bad.sum())} of {a.size} {a.dtype} elements differ " \
            f"(first: {a[bad][0]} vs {b[bad][0]})" or None
    rtol, atol = max(TOLERANCE.get(str(a.dtype), TOLERANCE["float32"]),
                     TOLERANCE.get(str(coarse), (0.0, 0.0)))
    a64, b64 = a.astype(float), b.astype(float)
    if not np.array_equal(np.isnan(a64), np.isnan(b64)):
        return f"NaN in different places ({int(np.isnan(a64).sum())} vs {int(np.isnan(b64).sum())})"
    fin = np.isfinite(a64) & np.isfinite(b64)
    if not np.array_equal(a64[~fin & ~np.isnan(a64)], b64[~fin & ~np.isnan(a64)]):
        return "infinities differ"
    scale, err = float(np.abs(a64[fin]).max()) if fin.any() else 0.0, np.abs(a64[fin] - b64[fin])
    if not err.size or err.max() <= atol + rtol * scale:
        return None
    if truth is not None and (near is None or err.max() <= near * (atol + rtol * scale)):
        t = np.asarray(truth, float)[fin]  # as accurate as the original (cancellation ...)
        if np.abs(b64[fin] - t).max() <= 10 * np.abs(a64[fin] - t).max() + atol + rtol * scale:
            return None
    return f"{a.dtype}: max |a-b| {err.max():.3g} > {atol:g} + {rtol:g} * {scale:.3g}"


@dataclasses.dataclass
class Outcome:
    status: str                 # ok, refused, mismatch, crash, invalid (not a valid program)
    where: str = ""             # outputs, vjp, jvp, jit, or the pass / stage that raised
    detail: str = ""
    refused: bool = False       # the drawn budget was refused; checked at the floor it named
    seen: dict = dataclasses.field(default_factory=dict)  # rules that fired, primitives traced
    compared: tuple = ()        # what was compared: "outputs", "vjp", "jvp"

    failed = property(lambda self: self.status in ("mismatch", "crash"))
    signature = property(lambda self: (self.status, self.where))  # what shrinking keeps


def _error(status, where, exc) -> Outcome:
    return Outcome(status, where, f"{type(exc).__name__}: {exc}")


def _refusal(exc) -> bool:  # graphopt.BudgetError, raised by remat or wrapped by the pipeline
    return any("below what rematerialization reaches" in str(e) for e in (exc, exc.__cause__))


def _evaluator(cj, modes, fpos, fout):
    """(flat inputs, {mode: cotangents | tangents}) -> {"outputs": ..., "vjp"/"jvp": ...}:
    ``cj`` and its vjp / jvp w.r.t. the float inputs ``fpos`` of the float outputs ``fout``."""
    fun = ir.jaxpr_as_fun(cj)

    def g(prim, extra):
        def h(*fl):  # the float outputs as a function of the float inputs
            full = dict(enumerate(prim)) | dict(zip(fpos, fl))
            outs = fun(*[full[i] for i in range(len(prim))])
            return [outs[j] for j in fout]
        res, x = {"outputs": list(fun(*prim))}, [prim[i] for i in fpos]
        if "vjp" in modes:
            res["vjp"] = list(jax.vjp(h, *x)[1](list(extra["vjp"])))
        if "jvp" in modes:
            res["jvp"] = list(jax.jvp(h, x, list(extra["jvp"]))[1])
        return res
    return g


def _compiled(fn, *args, options=None):
    return jax.tree_util.tree_map(np.asarray, jax.jit(fn).lower(*args).compile(
        compiler_options=options)(*args))


def _run_both(original, optimized, modes, fpos, fout, args, options):
    """(reference, optimized) values from one XLA program, or the Outcome saying which side
    does not compile (a ``while_loop`` is not reverse-differentiable: that mode is dropped)."""
    ev = lambda cj, m: _evaluator(cj, m, fpos, fout)  # noqa: E731
    try:
        return _compiled(lambda p, e: (ev(original, modes)(p, e), ev(optimized, modes)(p, e)),
                         *args, options=options)
    except Exception:
        modes = [m for m in modes if _lowers(ev(original, [m]), *args)]
        try:
            ref = _compiled(ev(original, modes), *args, options=options)
        except Exception as exc:
            return _error("invalid", "compile", exc)
        for m in [[]] + [[m] for m in modes] + [modes]:
            try:
                got = _compiled(ev(optimized, m), *args, options=options)
            except Exception as exc:
                where = f"{'/'.join(m) or 'compiling'} of the optimized program"
                return _error("crash", where, exc)
        return ref, got


def _lowers(fn, *args) -> bool:
    try:
        return bool(jax.jit(fn).lower(*args))
    except Exception:
        return False


def check_function(fn, inputs, config: dict, *, kind="fn", x64=False, opt=None, seed=0,
                   ad=("vjp", "jvp")) -> Outcome:
    """The oracle on ``fn``: a function of ``inputs`` (:class:`Input` or tuples (name, shape,
    dtype[, role, hi])), or with ``kind="step"`` a step(params, opt_state, batch) with optax
    optimizer ``opt``. ``config``: ``passes``, ``options`` (for graphopt.optimize), ``jit``."""
    with jax.enable_x64(bool(x64)):
        inputs = [i if isinstance(i, Input) else Input(*i) for i in inputs]
        vals = fp.make_inputs(Program(kind, inputs, [], []), seed)
        if kind == "fn":
            names, args = [i.name for i in inputs], tuple(vals[i.name] for i in inputs)
        else:
            params, batch = ({i.name: vals[i.name] for i in inputs if i.role == r}
                             for r in ("param", "batch"))
            names, args = ["params", "opt_state", "batch"], (params, opt.init(params), batch)
        leaves = jax.tree_util.tree_leaves(dict(zip(names, args)))  # graphopt.optimize's order
        return _check(fn, args, leaves, config, seed, ad)


def _check(fn, args, leaves, config, seed, ad) -> Outcome:
    options = dict(config.get("options", {}))
    try:
        optimized_fn = graphopt.optimize(fn, passes=config.get("passes"), **options)
        optimized = optimized_fn.jaxpr(*args)
    except Exception as exc:
        floor = _FLOOR.search(str(exc))
        if _refusal(exc) and floor and isinstance(options.get("memory_budget"), float):
            # a clear refusal: check the program again at the budget it names
            config = dict(config, options=dict(options, memory_budget=int(floor.group(1))))
            return dataclasses.replace(_check(fn, args, leaves, config, seed, ad), refused=True)
        if _refusal(exc):
            return Outcome("refused", "remat", str(exc).splitlines()[0], refused=True)
        if isinstance(exc, getattr(graphopt, "OptionError", ())):
            return _error("invalid", "config", exc)  # a config this graphopt rejects
        try:  # the program itself does not trace, or graphopt failed
            if not isinstance(exc, GraphoptError):
                jax.make_jaxpr(fn)(*args)
        except Exception:
            return _error("invalid", "trace", exc)
        where = re.search(r"pass '([\w-]+)'(?: failed: (\w+))?", str(exc))  # pass, inner error
        where = (f"{where.group(1) if where else 'graphopt'}: "
                 f"{where and where.group(2) or type(exc).__name__}")
        return _error("crash", where, exc)
    original = optimized_fn.original_jaxpr(*args)
    seen = {f"rule {k}" for r in optimized_fn.report(*args).records for k in r.stats.hits}
    seen = dict.fromkeys(seen | {f"primitive {p}" for p in ir.primitive_counts(original)}, 1)
    return dataclasses.replace(_compare_all(optimized_fn, fn, args, leaves, original, optimized,
                                            config, seed, ad), seen=seen)


def _compare_all(optimized_fn, fn, args, leaves, original, optimized, config, seed, ad) -> Outcome:
    if str(optimized) == str(original) and not config.get("jit"):
        return Outcome("ok", "unchanged")
    fpos = [i for i, a in enumerate(original.in_avals) if jnp.issubdtype(a.dtype, jnp.inexact)]
    fout = [j for j, a in enumerate(original.out_avals) if jnp.issubdtype(a.dtype, jnp.inexact)]
    pre_ad = any(ir.prim_name(e).startswith("custom_vjp") and "remat_pre_ad" in ir.name_stack(e)
                 for e, _, _ in ir.walk_eqns(optimized))  # segments are custom_vjp (documented)
    no_jvp = pre_ad or any(ir.prim_name(e).startswith("custom_vjp")
                           for e, _, _ in ir.walk_eqns(original))
    modes = [m for m in (ad if fpos and fout else ()) if m != "jvp" or not no_jvp]
    if pre_ad and fpos and fout and "vjp" not in modes:  # the segments' backward is what the
        modes.append("vjp")  # rewrite changed: never leave it unchecked when jvp is skipped
    return dataclasses.replace(_compare_modes(optimized_fn, fn, args, leaves, original, optimized,
                                              config, seed, modes, fpos, fout),
                               compared=("outputs", *modes))


def _compare_modes(optimized_fn, fn, args, leaves, original, optimized, config, seed, modes,
                   fpos, fout) -> Outcome:
    rng = np.random.default_rng(seed + 1)
    normal = [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in  # (co)tangents
              [original.out_avals[j] for j in fout] + [original.in_avals[i] for i in fpos]]
    extra = {"vjp": normal[:len(fout)], "jvp": normal[len(fout):]}

    coarse = _coarsest(original)

    def first_mismatch(options, truth=None, ref=None, near=None):
        res = _run_both(original, optimized, modes, fpos, fout, (leaves, extra), options)
        res = (ref, res[1]) if ref is not None and isinstance(res, tuple) else res
        return next(filter(None, (_compare(w, res[0][w], res[1][w], truth and truth[w], near,
                                           coarse)
                                  for w in res[0])), None) if isinstance(res, tuple) else res
    bad = first_mismatch(_FAST)
    if bad and bad.status == "mismatch":  # XLA at -O0 may round a comparison differently in
        bad = first_mismatch(None)  # two fusions (a max's gradient mask): confirm at default
    if bad and "max |a-b|" in bad.detail and not any(a.dtype == np.float64 for a in leaves):
        truth = _truth(fn, args, modes, fpos, fout, extra)  # None: no float64 twin
        bad = bad if truth is None else first_mismatch(None, truth)
    if bad and bad.status == "mismatch":  # the original's own compile may be the odd one out:
        eager = _eager(original, modes, fpos, fout, (leaves, extra))  # its mask fused apart
        bad = bad if eager is None or first_mismatch(None, ref=eager) and \
            first_mismatch(None, truth=eager) else None  # equal to it, or as near as jit's
    if bad and "max |a-b|" in bad.detail:  # an ill-conditioned program: rounding-sized input
        nudged = _nudged(original, modes, fpos, fout, (leaves, extra), seed)  # changes move it
        bad = bad if nudged is None else first_mismatch(None, nudged, near=NUDGE_NEAR)
    if bad:
        return bad
    if config.get("jit"):
        try:
            want = jax.tree_util.tree_leaves(jax.jit(fn)(*args))
        except Exception as exc:
            return _error("invalid", "jit", exc)
        try:
            got = jax.tree_util.tree_leaves(optimized_fn(*args))
        except Exception as exc:
            return _error("crash", "jit of the optimized program", exc)
        bad = _compare("jit", want, got, coarse=coarse)
        if bad:  # the original's own compile may be the odd one out (see _eager): the
            eager = _eager_fn(fn, args)  # optimized one may be as far from JAX's definition
            bad = bad if eager is None else \
                _compare("jit", eager, got, coarse=coarse) and \
                _compare("jit", want, got, eager, coarse=coarse)
        return bad or Outcome("ok")
    return Outcome("ok")


def _compare(what, ref, got, truth=None, near=None, coarse=None) -> Outcome | None:
    if len(ref) != len(got):
        return Outcome("mismatch", what, f"{what}: {len(got)} values, expected {len(ref)}")
    bad = next(((k, w) for k, (a, b, t) in enumerate(zip(ref, got, truth or [None] * len(ref)))
                if (w := mismatch(a, b, t, near, coarse))), None)
    return bad and Outcome("mismatch", what, f"{what}[{bad[0]}]: {bad[1]}")


def _eager(original, modes, fpos, fout, args):
    """The original's values op by op (no XLA fusion): what JAX defines it to compute. XLA
    may fuse a comparison (a max's gradient mask) into two consumers that round or treat
    NaN apart, so the compiled original can disagree with itself; a rewrite no further from
    this value than ten times the compiled original is (the float64 rule) is not wrong."""
    try:
        with jax.disable_jit():
            return jax.tree_util.tree_map(np.asarray, _evaluator(original, modes, fpos, fout)(*args))
    except Exception:
        return None


def _coarsest(cj) -> str | None:
    """The least precise float dtype among ``cj``'s inputs and values (seed 2026 program 1914:
    a float32 loss summed from bfloat16 terms carries bfloat16's precision), or None."""
    seen = {str(v.aval.dtype) for v in cj.jaxpr.invars} | {
        str(v.aval.dtype) for e, _, _ in ir.walk_eqns(cj) for v in e.outvars
        if hasattr(v.aval, "dtype")}
    floats = [d for d in TOLERANCE if d in seen]
    return max(floats, key=lambda d: TOLERANCE[d]) if floats else None


def _eager_fn(fn, args):
    """``fn`` op by op, its leaves (the jit path's :func:`_eager`), or None if it fails."""
    try:
        with jax.disable_jit():
            return [np.asarray(x) for x in jax.tree_util.tree_leaves(fn(*args))]
    except Exception:
        return None


def _nudged(original, modes, fpos, fout, args, seed):
    """The original at float inputs moved by :data:`NUDGE_ULPS` units in the last place (random
    signs): how far the program itself moves under rounding-sized changes. Where it
    cancels (a batch statistic of two nearly equal rows), a rewrite's reassociation moves it
    as far; a difference within ten times this, and under ``NUDGE_NEAR`` tolerances, passes."""
    leaves, extra = args
    rng = np.random.default_rng(seed + 2)

    def nudge(x):
        x = np.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        step = NUDGE_ULPS * float(jnp.finfo(x.dtype).eps) * rng.choice([-1.0, 1.0], x.shape)
        return (x.astype(np.float64) * (1 + step)).astype(x.dtype)
    try:
        return _compiled(_evaluator(original, modes, fpos, fout), [nudge(x) for x in leaves],
                         extra)
    except Exception:
        return None


def _truth(fn, args, modes, fpos, fout, extra):
    """The original's values with every float input (and (co)tangent) in float64."""
    up = lambda x: np.asarray(x, np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa
    try:
        with jax.enable_x64(True):
            args = jax.tree_util.tree_map(up, args)
            # traced as graphopt.optimize flattens (by argument name), so that fpos and fout
            # index the same leaves as in the original; (co)tangents in this trace's dtypes
            plain = graphopt.optimize(fn, passes=[])
            cj, flat = plain.original_jaxpr(*args), plain._build(args, {})[1]
            extra = {m: [np.asarray(x, avals[k].dtype) for x, k in zip(extra[m], pos)]
                     for m, avals, pos in (("vjp", cj.out_avals, fout), ("jvp", cj.in_avals, fpos))}
            return _compiled(_evaluator(cj, modes, fpos, fout), flat, extra)
    except Exception:  # e.g. a float32 constant meets a float64 value in a conv
        return None


def check(prog: Program, seed: int = 0) -> Outcome:
    """The oracle on one generated program (its source executed, its config applied)."""
    ns = dict(fp.NAMESPACE, optax=optax)
    try:
        exec(compile(prog.source(), f"<fuzz {prog.label}>", "exec"), ns)
    except Exception as exc:
        return _error("invalid", "source", exc)
    return check_function(ns["f"] if prog.kind == "fn" else ns["step"], prog.inputs, prog.config,
                          kind=prog.kind, x64=prog.x64, opt=ns.get("OPT"), seed=seed,
                          ad=prog.config.get("ad", ("vjp", "jvp")))


# ---------------------------------------------------------------- the runner
@dataclasses.dataclass
class Summary:
    n: int = 0
    seed: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list = dataclasses.field(default_factory=list)  # (k, outcome, shrunk program)
    seen: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0

    ok = property(lambda self: not self.failures)

    def line(self) -> str:
        return (f"fuzz: {self.n} programs, {self.counts['mismatch']} mismatches, "
                f"{self.counts['crash']} crashes, seed {self.seed}")


def draw_config(rng, prog) -> None:
    """passes (the default pipeline, or a random subset), options, jit, optimizer."""
    prog.config = {"options": {}, "jit": bool(rng.random() < 0.05)}
    r = rng.random()  # else the default pipeline
    if r < 0.45:
        prog.config["passes"] = [str(n) for n in rng.permutation(fp.PASSES)[: 1 + rng.integers(5)]]
    elif r < 0.55:  # every fusion forced, attention included (the default only where it pays)
        prog.config["passes"] = ["prune", "fuse"]
    opts = prog.config["options"]
    if rng.random() < 0.5:  # the fusions' cost models would never fire on programs this small
        opts.update(xent_min_bytes=1, xent_chunk=2, chain_ratio=1.0)
    if rng.random() < 0.2:
        opts["fold_max_bytes"] = int(rng.choice([16, 256, 65536]))
    if prog.kind == "fn" and rng.random() < 0.03:  # pre-AD remat: steer what jax.vjp saves
        opts.update(memory_budget=float(round(rng.uniform(0.1, 1.0), 2)), remat_solver="greedy")
    if prog.kind == "step":
        prog.config["optimizer"] = str(rng.choice(fp.OPTIMIZERS))
        b = prog.inputs[-1].shape[0]
        if rng.random() < 0.85:
            micro = ["auto", True, False] + [k for k in range(2, b + 1) if b % k == 0]
            opts.update(memory_budget=float(round(rng.uniform(0.05, 1.0), 2)),
                        remat_micro_batches=micro[rng.integers(len(micro))],
                        remat_measure="xla" if rng.random() < 0.03 else "estimate",
                        remat_solver="auto" if rng.random() < 0.2 else "greedy")
            for k in ("remat_order_backward", "remat_narrow_fence", "remat_skip_kept"):
                if opts["remat_measure"] == "xla" or rng.random() < 0.3:  # "auto" compiles all 8
                    opts[k] = bool(rng.random() < 0.5)
            if rng.random() < 0.2:
                opts["remat_scan"] = False


def program(seed: int, k: int, kind: str | None = None, passes=None, draw: int = 0) -> Program:
    """Program ``k`` of run ``seed`` (``--seed seed --start k --n 1``; ``draw``: a redraw)."""
    prog = fp.generate([seed, k, draw], kind)
    draw_config(np.random.default_rng([seed, k, draw, 2]), prog)
    prog.label = f"seed {seed} program {k}" + (f" draw {draw}" if draw else "")
    if passes is not None:
        prog.config["passes"] = list(passes)
    r = np.random.default_rng([seed, k, draw, 1]).random()  # which derivatives are checked
    r += 1.0 * ("sgd" not in prog.config.get("optimizer", "sgd"))  # adam: NaN derivatives at g = 0
    prog.config["ad"] = (("vjp", "jvp") if r < 0.15 else ("vjp",) if r < 0.6 else ("jvp",)) \
        if prog.kind == "fn" else ("vjp",) if r < 0.1 else ("jvp",) if r < 0.2 else ()
    return prog


def run(n: int = 1000, seed: int = 0, *, start: int = 0, kind: str | None = None, passes=None,
        shrink_failures: bool | int = True, save: str | None = None, log=print,
        shrink_seconds: float = 120.0, verbose: bool = False) -> Summary:
    """Check programs ``start .. start + n - 1`` of run ``seed``; the :class:`Summary` counts
    outcomes and holds every failure, shrunk (all, or the first ``shrink_failures``; saved
    in ``save`` as tests)."""
    summ, t0 = Summary(n=n, seed=seed), time.time()
    for k in range(start, start + n):
        for draw in range(20):  # a draw JAX rejects is drawn again
            try:
                prog = program(seed, k, kind, passes, draw)
            except Exception:
                continue
            out = check(prog)
            if verbose:
                log(f"{prog.label}: {out.status} {out.where} {out.detail[:200]}".rstrip())
            if out.status != "invalid":
                break
            summ.counts["invalid"] += 1
        summ.counts.update([out.status] + ["budget refused"] * out.refused)
        summ.seen.update(out.seen)
        if not out.failed:
            continue
        log(f"FAIL {prog.label}: {out.status} in {out.where}: {out.detail.splitlines()[0][:300]}")
        small, small_out = (shrink(prog, out, seconds=shrink_seconds) if shrink_failures is True
                            or len(summ.failures) < shrink_failures else (prog, out))
        summ.failures.append((k, small_out, small))
        log(to_test(small, small_out))
        if save:
            os.makedirs(save, exist_ok=True)
            path = os.path.join(save, f"test_fuzz_{re.sub(r'[^0-9a-z]+', '_', small.label)}.py")
            with open(path, "w") as f:
                f.write(to_test(small, small_out))
            log(f"saved {path}")
    summ.seconds = time.time() - t0
    return summ


from .fuzz_shrink import regression, shrink, to_test  # noqa: E402 (they call check)

__all__ = ["run", "check", "check_function", "regression", "shrink", "to_test", "program",
           "mismatch", "Outcome", "Summary", "TOLERANCE"]
