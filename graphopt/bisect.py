"""Which pass broke the program, and at which equation.

``graphopt.bisect(f, *args, passes=..., **options)`` runs the pipeline
``graphopt.optimize`` would run (the same passes, ``remat`` added under a
``memory_budget``), then compares each pass's output with the original program on
``args`` (outputs and VJP, :func:`graphopt.testing.compare_jaxprs` at the dtype
tolerance). The first pass whose output differs is the culprit; its input still agreed.

Within that pass's output it locates the equation: the input and output jaxprs of the
pass are evaluated side by side, one equation at a time, and values are compared where
the two programs are known to hold the same value: a variable defined in both (a pass
keeps the variables of the equations it keeps), an operand of a kept equation against
the operand it had before (a replaced value feeds the same consumer), and the program's
outputs by position. The first equation of the rewritten program whose value differs
from its counterpart is reported, with its source line; inside ``jit``-like calls,
``cond`` branches and ``scan`` iterations the search goes on in the sub-jaxpr. Where no
value differs (only gradients do, or the difference is in a ``while`` body), the
earliest changed equation is reported instead (``how == "changed"``).

Evaluating runs the programs' callbacks again (prints, ``io_callback``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

import jax

from . import ir, testing
from .errors import GraphoptError

# Higher-order primitives whose one body runs once on the equation's operands.
CALL_LIKE = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                       "custom_vjp_call", "remat2", "checkpoint", "custom_vmap_call"})
MAX_SCAN_STEPS = 10_000  # iterations replayed one by one to find the first diverging one


@dataclasses.dataclass
class BisectResult:
    """The first pass whose output differs from the original, and where (or none)."""
    pass_name: str | None = None
    round: int | None = None
    index: int | None = None          # position of the pass run in the pipeline's records
    equation: str = ""                # the rewritten equation whose value first differs
    source_line: str = ""
    max_rel_err: float = 0.0          # of that equation's value, else of the program
    how: str = ""                     # "value": a value differs; "changed": earliest change
    where: tuple = ()                 # enclosing equations and iterations, outermost first
    errors: dict = dataclasses.field(default_factory=dict)  # compare_jaxprs of the output
    passes: list = dataclasses.field(default_factory=list)  # names of the pass runs
    note: str = ""                    # why no equation is given, when locating failed

    @property
    def found(self) -> bool:
        return self.pass_name is not None

    def __str__(self) -> str:
        if not self.found:
            return (f"no difference: every pass output matches the original "
                    f"({len(self.passes)} pass runs: {', '.join(self.passes) or 'none'})")
        bad = ", ".join(f"{k} max rel err {v['max_rel_err']:.3g}"
                        for k, v in self.errors.items() if not v.get("ok", True))
        lines = [f"pass {self.pass_name!r} (round {self.round}, run {self.index + 1} of "
                 f"{len(self.passes)}) changed the program's results ({bad})"]
        if self.equation:
            what = ("first differing value" if self.how == "value"
                    else "earliest changed equation (no value differs on these inputs)")
            lines.append(f"  {what}: {self.equation}")
            if self.how == "value":
                lines.append(f"  max rel err {self.max_rel_err:.3g}")
            lines.append(f"  at {self.source_line or 'no source line'}")
            for w in self.where:
                lines.append(f"  inside {w}")
        if self.note:
            lines.append(f"  ({self.note})")
        return "\n".join(lines)


# ----------------------------------------------------------------- value helpers

def _comparable(aval) -> bool:
    dt = getattr(aval, "dtype", None)
    return ir.is_array_aval(aval) and dt is not None and (
        np.issubdtype(dt, np.number) or dt == np.bool_ or str(dt) == "bfloat16")


def _err(x, y, rtol) -> tuple[float, bool]:
    """(max relative error, within the dtype's tolerance)."""
    err = testing.max_rel_error(x, y)
    tol = rtol if rtol is not None else testing.RTOL.get(np.dtype(jax.numpy.result_type(x)), 0.0)
    return err, err <= tol


def _read(env, a):
    return env[a] if ir.is_var(a) else ir.literal_value(a)


def _bind_params(cj):
    return list(zip(cj.jaxpr.constvars, cj.consts))


def _evaluate(cj: ir.ClosedJaxpr, args) -> dict:
    """Every top-level variable's value (constants and inputs included)."""
    env = dict(_bind_params(cj))
    env.update(zip(cj.jaxpr.invars, args))
    for e in cj.jaxpr.eqns:
        outs = ir.bind_eqn(e, [_read(env, a) for a in e.invars])
        env.update((v, o) for v, o in zip(e.outvars, outs) if not ir.is_dropvar(v))
    return env


def _counterparts(before: ir.Jaxpr, after: ir.Jaxpr) -> dict:
    """{variable of ``after``: variables of ``before`` known to hold the same value}."""
    made = {v: i for i, e in enumerate(before.eqns) for v in e.outvars if ir.is_var(v)}
    defined = set(before.invars) | set(before.constvars) | set(made)
    corr: dict = {}

    def add(a, b):
        if ir.is_var(a) and ir.is_var(b) and a is not b:
            corr.setdefault(a, []).append(b)
    for e in after.eqns:
        outs = [v for v in e.outvars if ir.is_var(v)]
        src = {made.get(v) for v in outs}
        if outs and len(src) == 1 and None not in src:
            old = before.eqns[src.pop()]  # a kept equation: same results, operands may differ
            if old.primitive is e.primitive and len(old.invars) == len(e.invars):
                for a, b in zip(e.invars, old.invars):
                    add(a, b)
    for a, b in zip(after.outvars, before.outvars):
        add(a, b)
    for a in set(corr) | {v for e in after.eqns for v in e.outvars if ir.is_var(v)}:
        if a in defined:  # the same variable in both programs: the same value
            corr.setdefault(a, []).insert(0, a)
    return corr


# ------------------------------------------------------------------ locating

@dataclasses.dataclass
class _Spot:
    eqn: object
    err: float
    how: str
    where: tuple = ()


def _first_diverging(before, after, args_b, args_a, rtol, depth=0) -> _Spot | None:
    """The first equation of ``after`` whose value differs from its counterpart in
    ``before`` (searching on inside sub-jaxprs), or None."""
    env_b = _evaluate(before, args_b)
    corr = _counterparts(before.jaxpr, after.jaxpr)
    made_b = {v: e for e in before.jaxpr.eqns for v in e.outvars if ir.is_var(v)}
    env = dict(_bind_params(after))
    env.update(zip(after.jaxpr.invars, args_a))
    for e in after.jaxpr.eqns:
        ins = [_read(env, a) for a in e.invars]
        outs = ir.bind_eqn(e, ins)
        env.update((v, o) for v, o in zip(e.outvars, outs) if not ir.is_dropvar(v))
        bad, worst = False, 0.0
        for v, o in zip(e.outvars, outs):
            if not ir.is_var(v) or not _comparable(v.aval):
                continue
            for b in corr.get(v, ()):
                if b in env_b:
                    err, ok = _err(env_b[b], o, rtol)
                    bad, worst = bad or not ok, max(worst, err) if not ok else worst
        if bad:
            old = made_b.get(next((v for v in e.outvars if ir.is_var(v)), None))
            inner = None
            if old is not None and old.primitive is e.primitive and depth < 8:
                ins_b = [_read(env_b, a) for a in old.invars]
                inner = _descend(old, e, ins_b, ins, rtol, depth)
            return inner or _Spot(e, worst, "value")
    return None


def _body(eqn):
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None and (isinstance(sub, (ir.Jaxpr, ir.ClosedJaxpr))):
            return ir.as_closed(sub)
    return None


def _descend(old, new, ins_b, ins_a, rtol, depth) -> _Spot | None:
    """Go on inside a diverging higher-order equation kept by the pass."""
    name = new.primitive.name
    here = f"{name} at {ir.source_line(new) or 'no source line'}"

    def inside(b, a, xb, xa, label):
        if len(b.jaxpr.invars) != len(xb) or len(a.jaxpr.invars) != len(xa):
            return None
        spot = _first_diverging(b, a, xb, xa, rtol, depth + 1)
        if spot is not None:
            spot.where = (label,) + spot.where
        return spot
    if name in CALL_LIKE:
        b, a = _body(old), _body(new)
        if b is not None and a is not None:
            return inside(b, a, ins_b, ins_a, here)
    elif name == "cond":
        i = int(np.asarray(ins_a[0]))
        bb, ab = old.params["branches"], new.params["branches"]
        if len(bb) == len(ab) and i == int(np.asarray(ins_b[0])):
            return inside(ir.as_closed(bb[i]), ir.as_closed(ab[i]), ins_b[1:], ins_a[1:],
                          f"{here}, branch {i}")
    elif name == "scan":
        return _descend_scan(old, new, ins_b, ins_a, rtol, here, inside)
    return None


def _descend_scan(old, new, ins_b, ins_a, rtol, here, inside) -> _Spot | None:
    """Replay both scans iteration by iteration; search the first iteration whose body
    results differ."""
    (nc, nk, nx), (mc, mk, mx) = ir.scan_layout(old), ir.scan_layout(new)
    length = int(new.params["length"])
    if (nk, nx) != (mk, mx) or length > MAX_SCAN_STEPS or old.params.get("reverse") \
            != new.params.get("reverse"):
        return None
    bb, ab = ir.as_closed(old.params["jaxpr"]), ir.as_closed(new.params["jaxpr"])
    if len(bb.jaxpr.outvars) != len(ab.jaxpr.outvars):
        return None
    cb, ca = list(ins_b[nc:nc + nk]), list(ins_a[mc:mc + mk])
    steps = range(length - 1, -1, -1) if new.params.get("reverse") else range(length)
    for t in steps:
        xb = list(ins_b[:nc]) + cb + [x[t] for x in ins_b[nc + nk:]]
        xa = list(ins_a[:mc]) + ca + [x[t] for x in ins_a[mc + mk:]]
        ob, oa = ir.eval_jaxpr(bb, *xb), ir.eval_jaxpr(ab, *xa)
        if any(not _err(p, q, rtol)[1] for p, q, v in zip(ob, oa, bb.jaxpr.outvars)
               if _comparable(v.aval)):
            return inside(bb, ab, xb, xa, f"{here}, iteration {t}")
        cb, ca = list(ob[:nk]), list(oa[:mk])
    return None


def _earliest_change(before, after, where=()) -> tuple | None:
    """(equation, enclosing labels) of the first equation of ``after`` that is not an
    equation of ``before``, looking inside sub-jaxprs that changed."""
    b_eqns = {id(e): e for e in before.jaxpr.eqns}
    by_out = {v: e for e in before.jaxpr.eqns for v in e.outvars if ir.is_var(v)}
    for e in after.jaxpr.eqns:
        if id(e) in b_eqns:
            continue
        old = by_out.get(next((v for v in e.outvars if ir.is_var(v)), None))
        if old is not None and old.primitive is e.primitive and list(old.invars) == list(e.invars):
            subs_b = list(ir.subjaxpr_params(old))
            subs_a = list(ir.subjaxpr_params(e))
            label = f"{e.primitive.name} at {ir.source_line(e) or 'no source line'}"
            for (kb, ib, sb), (ka, ia, sa) in zip(subs_b, subs_a):
                if (kb, ib) == (ka, ia) and sb is not sa:
                    got = _earliest_change(ir.as_closed(sb), ir.as_closed(sa), where + (label,))
                    if got is not None:
                        return got
        return e, where
    return None


def locate(before: ir.ClosedJaxpr, after: ir.ClosedJaxpr, flat_inputs: Sequence,
           rtol: float | None = None) -> _Spot | None:
    """Where ``after`` (a pass's output) first departs from ``before`` (its input)."""
    with jax.ensure_compile_time_eval():  # concrete values even under an outer jit trace
        spot = _first_diverging(before, after, list(flat_inputs), list(flat_inputs), rtol)
    if spot is not None:
        return spot
    got = _earliest_change(before, after)
    return None if got is None else _Spot(got[0], 0.0, "changed", got[1])


# ------------------------------------------------------------------ the search

def _differs(errs: dict) -> bool:
    return any(not v["ok"] for v in errs.values())


def first_differing_pass(original_cj: ir.ClosedJaxpr, records_or_pipeline, flat_inputs: Sequence,
                         *, ctx=None, rtol: float | None = None,
                         locate_equation: bool = True) -> BisectResult | None:
    """The first pass run whose output differs from ``original_cj`` on ``flat_inputs``
    (outputs and VJP at the dtype tolerance), with the equation where it departs; None
    when every pass output matches.

    ``records_or_pipeline``: the :class:`~graphopt.passes.PassRecord` list of a pipeline
    run on ``original_cj`` (``Report.records``), or a :class:`~graphopt.passes.Pipeline`
    to run now (with ``ctx``).
    """
    records = records_or_pipeline
    if hasattr(records_or_pipeline, "run"):
        records = records_or_pipeline.run(original_cj, ctx)[1]
    records = list(records)
    if any(ir.is_tracer(x) for x in flat_inputs):
        raise GraphoptError("first_differing_pass needs concrete inputs, not tracers "
                            "(use graphopt.testing.random_like on the input avals)")
    names = [r.name for r in records]
    for k, rec in enumerate(records):
        if not rec.changed:  # its output is its input, already found equal
            continue
        errs = testing.compare_jaxprs(original_cj, rec.after, list(flat_inputs), rtol=rtol)
        if not _differs(errs):
            continue
        worst = max(v["max_rel_err"] for v in errs.values())
        res = BisectResult(rec.name, rec.round, k, max_rel_err=worst, errors=errs, passes=names)
        spot = None
        if locate_equation:
            try:
                spot = locate(rec.before, rec.after, flat_inputs, rtol)
            except Exception as exc:  # the pass is named either way; the equation is a help
                res.note = f"locating the equation failed: {type(exc).__name__}: {exc}"
        if spot is not None:
            res.equation, res.source_line = str(spot.eqn), ir.source_line(spot.eqn)
            res.how, res.where = spot.how, tuple(spot.where)
            if spot.how == "value":
                res.max_rel_err = spot.err
        return res
    return None


def bisect(f, *args, passes=None, static_argnums=(), static_argnames=(), max_rounds: int = 4,
           rtol: float | None = None, **options) -> BisectResult:
    """Run ``graphopt.optimize(f, passes=passes, **options)``'s pipeline on ``args`` and
    name the first pass whose output differs from ``f`` (and the equation where); a
    result with ``found == False`` ("no difference") when none does."""
    from .api import Optimized
    if isinstance(passes, str):
        passes = [passes]
    opt = Optimized(f, passes=passes, jit=False, options=options, max_rounds=max_rounds,
                    static_argnums=static_argnums, static_argnames=static_argnames)
    entry, leaves = opt._build(args, {})
    if any(ir.is_tracer(x) for x in leaves):
        raise GraphoptError("graphopt.bisect needs concrete arguments: call it outside "
                            "jax.jit / jax.grad")
    records = entry.report.records
    res = first_differing_pass(entry.original, records, leaves, rtol=rtol)
    return res if res is not None else BisectResult(passes=[r.name for r in records])


__all__ = ["bisect", "first_differing_pass", "locate", "BisectResult"]
