"""Mixed precision as a jaxpr rewrite: ``graphopt.optimize(f, precision="bfloat16")``.

What it rewrites: float32 matmuls and convolutions get compute-dtype (bfloat16 or
float16) inputs with float32 accumulation (``preferred_element_type``); the elementwise
ops between them follow their inputs into the compute dtype; exponentials, logarithms,
sums, normalisation statistics and the loss stay float32 (the policy table is in
``precision_rules``, the cast placement in ``precision_casts``). Casts go right before
the use that needs them, slide past shape ops to the smaller side, and are reused, so
no convert chain is left behind.

When it must not: the program's interface never changes (parameters, optimizer state
and outputs keep their dtypes; every jaxpr level, sub-jaxprs included, keeps its own);
integer and boolean values are never cast; float64 only with
``Precision(cast_float64=True)``; a value that flows only into the program's outputs
through elementwise ops (an optimizer update) stays float32. Primitives graphopt does
not know pass through untouched and are reported.

Works before AD (the casts are differentiated) and after it (backward dots are cast
too), inside ``scan``/``cond``/``while``/``custom_jvp``/``custom_vjp`` bodies.
"""
from __future__ import annotations

import warnings

import numpy as np

from graphopt import cost, ir
from graphopt.interpreter import Stats
from graphopt.passes import Pass, PassContext, PassResult, register_pass

from . import precision_rules as rules
from .precision_casts import SINKABLE, Level, is_float_dtype, nelems
from .precision_rules import ALLOW, CLEAR, DENY, INFER, Precision, as_precision

LOSS_SCALING_SCOPE = "graphopt_loss_scaling"
_F32 = np.dtype(np.float32)
_warned_fp16 = False


class _Run:
    """Settings and counters shared by every level of one pass run."""

    def __init__(self, pol: Precision, stats: Stats, platform: str = "cpu",
                 placement: str = "pre-AD"):
        self.pol = pol
        self.placement = placement
        self.low = pol.dtype
        self.castable = pol.castable()
        self.keep = set(pol.keep_float32)
        self.matched: set = set()
        self.stats = stats
        self.casts = 0
        self.memo: dict = {}
        self.cpu_batched_bf16_quirk = platform == "cpu" and pol.compute == "bfloat16"

    def lowish_dtype(self, dt) -> bool:
        return np.dtype(dt) == self.low

    def klass(self, eqn, scopes: tuple) -> str:
        name = eqn.primitive.name
        if LOSS_SCALING_SCOPE in ir.name_stack(eqn) or LOSS_SCALING_SCOPE in scopes:
            return "keep"  # unscaling and the finiteness test need float32's range
        if self.keep:
            hit = {name} & self.keep | set(scopes + ir.scope_path(ir.name_stack(eqn))) & self.keep
            if hit:
                self.matched |= hit
                return "keep"
        if name == "convert_element_type":
            return "convert"
        if name not in ir.known_primitives():
            return "unknown"
        if ir.has_subjaxprs(eqn):
            return "call"
        return rules.policy_class(name)


# ------------------------------------------------------------------ analysis

def _float_vars(atoms):
    return [a for a in atoms if ir.is_var(a) and is_float_dtype(a.aval.dtype)]


def _keep_high(jaxpr, run: _Run, scopes, free: bool = False) -> tuple[set, set]:
    """(values every use of which wants the program's own dtype: outputs, and values
    flowing to them only through elementwise and shape ops (an optimizer update);
    values some use reads in their own dtype)."""
    high = set() if free else {v for v in jaxpr.outvars if ir.is_var(v)}
    users: dict = {}
    for e in jaxpr.eqns:
        for a in e.invars:
            if ir.is_var(a):
                users.setdefault(a, []).append(e)
    wide = set(high)  # values at least one use reads in their own (wide) dtype
    for e in reversed(jaxpr.eqns):
        for v in e.outvars:
            if not ir.is_var(v) or v in high or v not in users:
                continue
            wants = []
            for u in users[v]:
                k = run.klass(u, scopes)
                if k == ALLOW:
                    wants.append(False)
                elif k in (INFER, CLEAR):
                    outs = _float_vars(u.outvars)
                    # a comparison (bool result) decides on the value as the program has it
                    wants.append(not outs or all(w in high for w in outs))
                elif k == "convert":
                    wants.append(not run.lowish_dtype(u.outvars[0].aval.dtype))
                else:
                    wants.append(True)
            if all(wants):
                high.add(v)
            if any(wants):
                wide.add(v)
    return high, wide


# ------------------------------------------------------------------ rewrite

def _rewrite(cj: ir.ClosedJaxpr, run: _Run, scopes: tuple = (), low_in=None) -> ir.ClosedJaxpr:
    """``cj`` rewritten with its interface kept, or, given ``low_in`` (per input: it
    arrives in the compute dtype), specialised to low-precision inputs and outputs."""
    jaxpr = cj.jaxpr
    free = low_in is not None
    high, wide = _keep_high(jaxpr, run, scopes, free)
    lv = Level()
    lv.wide = wide
    lv.low_dtype = run.low
    invars = list(jaxpr.invars)
    for i, v in enumerate(jaxpr.invars if free else ()):
        if low_in[i]:
            invars[i] = ir.new_var(v.aval.update(dtype=run.low, weak_type=False))
            lv.define(v, {run.low: invars[i]}, low=True)
    for eqn in jaxpr.eqns:
        lv.site = eqn.source_info
        k = run.klass(eqn, scopes)
        if k == "unknown":
            run.stats.unknown[eqn.primitive.name] += 1
        handler = _HANDLERS.get(k, _at_own_dtype)
        handler(lv, eqn, run, high, scopes)
    lv.site = None
    outs = [lv.get(v, run.low if free and v in lv.low and lv.has(v, run.low) else v.aval.dtype)
            if ir.is_var(v) else v for v in jaxpr.outvars]
    run.casts += lv.casts
    if not free and not lv.changed and all(a is b for a, b in zip(outs, jaxpr.outvars)):
        return cj
    new = ir.make_jaxpr_from(jaxpr, invars=invars, outvars=outs, eqns=lv.eqns)
    return ir.closed(new, cj.consts)


def _own(lv: Level, eqn):
    return [lv.get(a, a.aval.dtype) if ir.is_var(a) else a for a in eqn.invars]


def _at_own_dtype(lv: Level, eqn, run, high, scopes):
    """Deny, default and unknown: inputs in their own dtype, the equation unchanged."""
    lv.emit(eqn, _own(lv, eqn))


def _call(lv: Level, eqn, run, high, scopes):
    """Higher-order: every sub-jaxpr is rewritten with its own interface kept."""
    inner = scopes + ir.scope_path(ir.name_stack(eqn))

    def sub(j, is_open):
        key = (id(j.jaxpr), inner)
        got = run.memo.get(key)
        if got is not None and got[0] is j.jaxpr:
            return got[1]
        out = _rewrite(j, run, inner)
        run.memo[key] = (j.jaxpr, out)
        return out

    if _specialise(lv, eqn, run, inner):
        return
    new = ir.map_subjaxprs(eqn, sub)
    if new is not eqn:
        lv.changed = True
    lv.emit(new, _own(lv, eqn))


# Calls whose body may be re-typed to low-precision inputs. custom_vjp's bwd is never
# re-typed; custom_jvp's jvp rule is traced for the call's original types, so its body is
# re-typed only post-AD (nothing differentiates it after; pre-AD jax.grad would fail).
_SPECIALISABLE = frozenset({"custom_jvp_call", "pjit", "jit", "closed_call"})


def _all_low_safe(cj, run, scopes) -> bool:
    for e, _, _ in ir.walk_eqns(cj):
        if e.primitive.name in _SPECIALISABLE:
            continue
        if run.klass(e, scopes) not in (ALLOW, INFER, CLEAR, "convert"):
            return False
    return True


def _specialise(lv: Level, eqn, run, scopes) -> bool:
    """A call fed low-precision values whose body holds only ops the policy runs low
    anyway (``jax.nn.relu``): its body is re-typed so the values stay low across it."""
    if eqn.primitive.name not in _SPECIALISABLE or (
            eqn.primitive.name == "custom_jvp_call" and run.placement != "post-AD"):
        return False
    lit = [ir.is_literal(a) and _castable(run, a) and _cheap(lv, a, 2) for a in eqn.invars]
    low_in = [(_is_low(lv, run, a) and _castable(run, a)) or lt for a, lt in zip(eqn.invars, lit)]
    floats = [a for a, lt in zip(eqn.invars, lit) if is_float_dtype(a.aval.dtype) and not lt]
    if not any(low_in) or not any(_is_low(lv, run, a) for a in floats) or not all(
            _is_low(lv, run, a) or not _castable(run, a) for a in floats):
        return False
    subs = list(ir.subjaxpr_params(eqn))
    if len(subs) != 1 or ir.is_open_subjaxpr(eqn, subs[0][0], subs[0][2]):
        return False
    body = ir.as_closed(subs[0][2])
    if not _all_low_safe(body, run, scopes):
        return False
    new_body = _rewrite(body, run, scopes, low_in)
    ins = [lv.get(a, run.low) if low_in[i] else (lv.get(a, a.aval.dtype) if ir.is_var(a) else a)
           for i, a in enumerate(eqn.invars)]
    outs = [ir.new_var(a) for a in new_body.out_avals]
    new = ir.map_subjaxprs(eqn, lambda j, is_open: new_body)
    lv.eqns.append(new.replace(invars=ins, outvars=outs))
    lv.changed = True
    for v, o in zip(eqn.outvars, outs):
        lv.define(v, {o.aval.dtype: o}, low=run.lowish_dtype(o.aval.dtype))
    return True


def _castable(run, a) -> bool:
    return is_float_dtype(a.aval.dtype) and np.dtype(a.aval.dtype) in run.castable


def _allow(lv: Level, eqn, run, high, scopes):
    """Matmul / convolution: compute-dtype operands, float32 accumulation."""
    ins = eqn.invars[:2]
    if not all(is_float_dtype(a.aval.dtype) for a in ins) or not all(
            _castable(run, a) or run.lowish_dtype(a.aval.dtype) for a in ins):
        return _at_own_dtype(lv, eqn, run, high, scopes)
    new_in = [lv.get(a, run.low) for a in ins] + _own(lv, eqn)[2:]
    out_dt = np.dtype(eqn.outvars[0].aval.dtype)
    acc = _F32 if out_dt in (_F32, run.low) else out_dt
    if eqn.outvars[0] not in lv.wide:
        acc = run.low  # read only in low precision: XLA accumulates in float32 inside
    elif run.cpu_batched_bf16_quirk and _cpu_quirk_dot(eqn):
        acc = run.low  # XLA:CPU's DotThunk has no BF16 x BF16 = F32 for these layouts
        run.stats.note("precision: dots return bfloat16 on CPU (XLA:CPU has no BF16 x BF16 "
                       "= F32 dot for many layouts; it computes them in float32 inside)")
    params = {}
    if eqn.params.get("preferred_element_type") != acc:
        params["preferred_element_type"] = acc
    (out,) = lv.emit(eqn, new_in, **params)
    lv.define(eqn.outvars[0], {out.aval.dtype: out}, low=True)


def _cpu_quirk_dot(eqn) -> bool:
    if eqn.primitive.name != "dot_general":
        return False
    return True  # XLA:CPU rewrites dot layouts itself, so no dot shape is known safe


def _is_low(lv, run, a) -> bool:
    return ir.is_var(a) and (a in lv.low or run.lowish_dtype(a.aval.dtype))


def _cheap(lv, a, size: int) -> bool:
    """A float32 input cheap to cast: smaller than the result, or a broadcast of a
    smaller value (a bias, a scale, a statistic); never a value the cast would flush."""
    low = lv.low_dtype
    if ir.is_literal(a):
        v = np.asarray(ir.literal_value(a), np.float64)
        with np.errstate(under="ignore"):
            c = v.astype(low)  # casts saturate (see Level.get): only flushing to 0 counts
        return bool(np.all((c == 0) == (v == 0)))
    if nelems(a.aval) <= 1:
        # float16's range is narrow: a float32 scalar (a loss scale) could over/underflow
        return low != np.dtype(np.float16)
    rec = lv.recipe.get(a)
    return nelems(a.aval) < size or (rec is not None and nelems(rec[1].aval) < nelems(a.aval))


def _infer(lv: Level, eqn, run, high, scopes):
    """Elementwise: low when an input is low and the rest are low or cheap to cast."""
    floats = [a for a in eqn.invars if is_float_dtype(a.aval.dtype)]
    outs_f = _float_vars(eqn.outvars)
    size = max(nelems(v.aval) for v in eqn.outvars)
    go_low = (floats and any(_is_low(lv, run, a) for a in floats)
              and all(_is_low(lv, run, a) or (_castable(run, a) and _cheap(lv, a, size))
                      for a in floats)
              and not (outs_f and all(v in high for v in outs_f)))
    if not go_low:
        return _at_own_dtype(lv, eqn, run, high, scopes)
    new_in = [lv.get(a, run.low) if is_float_dtype(a.aval.dtype) else
              (lv.get(a, a.aval.dtype) if ir.is_var(a) else a) for a in eqn.invars]
    outs = lv.emit(eqn, new_in)
    for v, o in zip(eqn.outvars, outs):
        if ir.is_var(v):
            castable_out = is_float_dtype(v.aval.dtype) and (
                np.dtype(v.aval.dtype) in run.castable or run.lowish_dtype(v.aval.dtype))
            lv.define(v, {o.aval.dtype: o}, low=castable_out)


def _clear(lv: Level, eqn, run, high, scopes):
    """Shape op: runs on the dtype its data operand already has; casts slide past it."""
    if not eqn.invars:
        return _at_own_dtype(lv, eqn, run, high, scopes)
    a, v = eqn.invars[0], eqn.outvars[0]
    if ir.is_literal(a):  # a broadcast constant: remember it, a later cast then sinks
        _at_own_dtype(lv, eqn, run, high, scopes)
        if eqn.primitive.name in SINKABLE and len(eqn.outvars) == 1:
            lv.recipe[v] = (eqn, a)
        return
    is_low = _is_low(lv, run, a) and v not in high and _castable(run, v)
    use_dt = run.low if is_low and lv.has(a, run.low) else np.dtype(a.aval.dtype)
    new_in = [lv.get(a, use_dt)] + _own(lv, eqn)[1:]
    outs = lv.emit(eqn, new_in)
    if len(eqn.outvars) != 1:
        for w, o in zip(eqn.outvars, outs):
            lv.define(w, {o.aval.dtype: o})
        return
    lv.define(v, {outs[0].aval.dtype: outs[0]}, low=is_low)
    if eqn.primitive.name in SINKABLE and use_dt == np.dtype(a.aval.dtype):
        lv.recipe[v] = (eqn, a)


def _convert(lv: Level, eqn, run, high, scopes):
    """User casts: reuse an atom already in the target dtype (chains fold away)."""
    a, v = eqn.invars[0], eqn.outvars[0]
    new_dt = np.dtype(v.aval.dtype)
    if not ir.is_var(a) or not (is_float_dtype(a.aval.dtype) and is_float_dtype(new_dt)):
        return _at_own_dtype(lv, eqn, run, high, scopes)
    if lv.has(a, new_dt) and not eqn.params.get("weak_type", False):
        lv.define(v, {new_dt: lv.get(a, new_dt)}, low=run.lowish_dtype(new_dt))
        lv.changed = True
        return
    src = lv.get(a, a.aval.dtype)
    (out,) = lv.emit(eqn, [src] + _own(lv, eqn)[1:])
    have = {new_dt: out}
    src_dt = np.dtype(a.aval.dtype)
    if np.dtype(src_dt).itemsize <= new_dt.itemsize:
        have[src_dt] = src  # an exact up-cast: the narrow value stays usable
    low = _is_low(lv, run, a) and (_castable(run, v) or run.lowish_dtype(new_dt))
    lv.define(v, have, low=low)


_HANDLERS = {ALLOW: _allow, INFER: _infer, CLEAR: _clear, DENY: _at_own_dtype,
             "convert": _convert, "call": _call, "unknown": _at_own_dtype,
             "keep": _at_own_dtype}


# ------------------------------------------------------------------ report

def low_flop_share(cj, low_dtypes=("bfloat16", "float16")) -> tuple[float, float]:
    """(dot/conv FLOPs with low-precision operands, all dot/conv FLOPs), nested included."""
    low_f = tot = 0.0
    for e, w, _ in ir.walk_eqns(cj):
        name = e.primitive.name
        if name not in ("dot_general", "conv_general_dilated"):
            continue
        f = cost.FLOP_RULES[name](e) * w
        tot += f
        if all(np.dtype(a.aval.dtype).name in low_dtypes for a in e.invars[:2]):
            low_f += f
    return low_f, tot


def _warn_float16(cj, pol: Precision, ctx: PassContext) -> None:
    global _warned_fp16
    if pol.compute != "float16" or ctx.placement != "post-AD" or _warned_fp16:
        return
    if any(LOSS_SCALING_SCOPE in ir.name_stack(e) for e, _, _ in ir.walk_eqns(cj)):
        return
    _warned_fp16 = True
    warnings.warn("graphopt precision='float16' on a training step without loss scaling: "
                  "small gradients underflow in float16; wrap the optimizer with "
                  "graphopt.loss_scaling(...) and scale the loss (see docs/precision.md), "
                  "or use precision='bfloat16'", UserWarning, stacklevel=2)


def precision_pass(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    ctx = ctx if ctx is not None else PassContext()
    stats = Stats()
    pol = as_precision(ctx.option("precision"))
    if pol is None:
        stats.note("precision: no precision option given; nothing cast")
        return PassResult(cj, False, stats)
    run = _Run(pol, stats, ctx.platform, ctx.placement)
    out = _rewrite(cj, run)
    for k in sorted(run.keep - run.matched):
        stats.note(f"precision: keep_float32 entry {k!r} matched no primitive or named scope")
    low_f, tot = low_flop_share(out, (pol.compute,))
    stats.details["precision"] = {
        "compute": pol.compute, "casts_added": run.casts,
        "low_precision_flop_share": (low_f / tot) if tot else None,
        "dot_conv_flops": tot, "keep_float32_matched": sorted(run.matched)}
    if run.casts:
        stats.hit("casts_added", run.casts)
    if tot:
        stats.note(f"precision: {run.casts} casts added; {100 * low_f / tot:.1f}% of dot/conv "
                   f"FLOPs in {pol.compute}")
    if not any(_castable(run, v) for e, _, _ in ir.walk_eqns(cj) for v in e.outvars
               if ir.is_var(v)):
        stats.note("precision: no castable float value (integer/bool program, or float64 "
                   "without Precision(cast_float64=True)); nothing cast")
    _warn_float16(cj, pol, ctx)
    return PassResult(out, out is not cj, stats)


precision = register_pass(Pass("precision", precision_pass,
                               "float32 -> bfloat16/float16 compute with float32 "
                               "accumulation and a deny list", "precision"))

__all__ = ["precision", "precision_pass", "Precision", "low_flop_share", "LOSS_SCALING_SCOPE"]
