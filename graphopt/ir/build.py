"""Building and running jaxprs: new jaxprs from templates, constants, re-binding one
equation, tracing a helper and inlining its equations with fresh variables."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

import jax

from .atoms import impure, is_dropvar, is_var
from .compat import ClosedJaxpr, Jaxpr, _siu, new_var
from .subjaxprs import has_subjaxprs


def _fit_debug_info(dbg, n_in: int, n_out: int):
    """Debug info whose arg/result name counts match a jaxpr whose interface changed."""
    if dbg is None:
        return None
    fix = {}
    if dbg.arg_names is not None and len(dbg.arg_names) != n_in:
        fix["arg_names"] = tuple(("",) * n_in)
    rp = dbg.result_paths
    if isinstance(rp, tuple) and len(rp) != n_out:
        fix["result_paths"] = tuple(("",) * n_out)
    return dbg._replace(**fix) if fix else dbg


def eqns_effects(eqns) -> frozenset:
    out = set()
    for e in eqns:
        out |= set(e.effects)
    return frozenset(out)


def make_jaxpr_from(template: Jaxpr, *, constvars=None, invars=None, outvars=None,
                    eqns=None, effects=None) -> Jaxpr:
    """A new :class:`Jaxpr` like ``template`` with the given parts replaced.

    Effects default to the template's, restricted to what the equations still carry
    plus input effects (state refs) the template declared.
    """
    constvars = template.constvars if constvars is None else constvars
    invars = template.invars if invars is None else invars
    outvars = template.outvars if outvars is None else outvars
    eqns = template.eqns if eqns is None else eqns
    if effects is None:
        kept = eqns_effects(eqns)
        effects = frozenset(e for e in template.effects
                            if e in kept or type(e).__name__ == "JaxprInputEffect") | kept
    dbg = _fit_debug_info(template.debug_info, len(invars), len(outvars))
    return Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), effects, dbg)


def dce_same_interface(jaxpr: Jaxpr, keep_impure: bool = True) -> Jaxpr:
    """``jaxpr`` without equations nothing reads, same invars and outvars (effectful and
    random ones stay unless ``keep_impure`` is False: a slice that only recomputes)."""
    need = {v for v in jaxpr.outvars if is_var(v)}
    kept = []
    for e in reversed(jaxpr.eqns):
        if (keep_impure and impure(e)) or any(is_var(v) and v in need for v in e.outvars):
            kept.append(e)
            need.update(a for a in e.invars if is_var(a))
    kept.reverse()
    return make_jaxpr_from(jaxpr, eqns=kept)


def closed(jaxpr: Jaxpr, consts: Sequence = ()) -> ClosedJaxpr:
    return ClosedJaxpr(jaxpr, [canonical_const(c) for c in consts])


def canonical_const(c):
    """A constant as JAX's tracers accept it: a jax.Array, not a NumPy array (a pass
    folding on NumPy values would otherwise break a later trace of the program, e.g.
    differentiating it again)."""
    if isinstance(c, (np.ndarray, np.generic)):
        with jax.ensure_compile_time_eval():  # a concrete array even under an outer trace
            return jax.numpy.asarray(c)
    return c


def bind_eqn(eqn, vals: Sequence, **param_updates) -> list:
    """Run one equation on ``vals`` (arrays or tracers, one per invar, literals included)
    with some params replaced: re-running a first-order equation at another shape
    (a micro-batch) needs its shape params changed. Returns one value per outvar."""
    if has_subjaxprs(eqn) and param_updates:
        raise ValueError(f"bind_eqn: cannot change params of {eqn.primitive} "
                         "(it carries sub-jaxprs)")
    # what jax.core.eval_jaxpr does per equation (JAX 0.10 to 0.12), the equation's
    # name stack and source line restored so a re-bound backward stays 'transpose(...)'
    params = eqn.primitive.get_bind_params({**eqn.params, **param_updates})
    si = eqn.source_info
    with (_siu.user_context(si.traceback, name_stack=_siu.current_name_stack() + si.name_stack),
          eqn.ctx.manager):
        out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def trace_flat(fn: Callable, avals: Sequence) -> ClosedJaxpr:
    """Trace ``fn(*flat_args)`` on abstract values into a closed jaxpr."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
             for a in avals]
    return jax.make_jaxpr(fn)(*specs)


@dataclasses.dataclass
class Inlined:
    """Equations of a traced helper, wired to caller atoms."""
    eqns: list
    outs: list
    consts: list  # (constvar, value) pairs the caller must provide


def copy_eqns(inner: Jaxpr, in_atoms: Sequence, const_atoms: Sequence = ()) -> tuple[list, list]:
    """The equations of ``inner`` with fresh variables, wired to the given atoms.

    Fresh variables matter: JAX caches traces, so one traced body inlined twice would
    otherwise define the same variables twice. Returns (equations, output atoms).
    """
    sub = dict(zip(inner.constvars, const_atoms))
    sub.update(zip(inner.invars, in_atoms))
    out = []
    for e in inner.eqns:
        ins = [sub.get(v, v) if is_var(v) else v for v in e.invars]
        outs = []
        for v in e.outvars:
            nv = new_var(v.aval)
            if not is_dropvar(v):
                sub[v] = nv
            outs.append(nv)
        out.append(e.replace(invars=ins, outvars=outs))
    return out, [sub.get(v, v) if is_var(v) else v for v in inner.outvars]


def inline(fn: Callable, in_atoms: Sequence) -> Inlined:
    """Trace ``fn`` on the avals of ``in_atoms``; its equations (fresh variables) wired to
    them. Array constants it captured come back in ``consts`` under new constvars."""
    cj = trace_flat(fn, [a.aval for a in in_atoms])
    cvs = [new_var(v.aval) for v in cj.jaxpr.constvars]
    eqns, outs = copy_eqns(cj.jaxpr, list(in_atoms), cvs)
    return Inlined(eqns, outs, list(zip(cvs, cj.consts)))
