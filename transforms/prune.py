"""Pruning: dead code, constant folding, common subexpressions, algebraic identities.

Passes (names as in ``graphopt.optimize(passes=[...])``; ``"prune"`` runs them all):

- ``dce``: drops equations whose results nobody reads, and unused outputs of ``jit``,
  ``cond``, ``scan``, ``custom_jvp/vjp``, ``remat`` and unused carries of ``while``.
  Must not drop: effectful equations (print, callbacks, state), random ones, and
  primitives graphopt does not know (they pass through and are counted).
- ``fold``: evaluates pure equations whose inputs are all constants, when the result
  is at most ``fold_max_bytes`` (default 64 KiB) so big constants are never
  materialized into the program. Never runs random or effectful equations.
- ``cse``: merges equations with the same primitive, parameters and inputs. Never
  merges random, effectful or unknown equations.
- ``simplify``: exact algebraic identities (x*1, x+0, x/1, -(-x), transpose chains,
  reshape chains, no-op converts/broadcasts/reductions, select on a constant
  predicate, integer max(x, x) ...). Rules that would change NaN/Inf behaviour (x*0 -> 0,
  x-x -> 0, a float max(x, x) whose derivative at NaN is 0) are deliberately absent.
"""
from __future__ import annotations

import dataclasses

import numpy as np

import jax

from graphopt import ir
from graphopt.interpreter import RuleTable, Rewriter, Stats, rewrite
from graphopt.passes import Pass, PassContext, PassResult, register_group, register_pass

# simplification lives in its own module (a rule per primitive); registered here with the family
from .prune_simplify import SIMPLIFY, simplify

# ============================================================================ DCE

# Output-pruning rules for higher-order primitives: rule(used_outputs, eqn, stats)
# -> (used_inputs, new_eqn). Default: JAX's own rule when it has one, else keep all.
DCE_RULES: dict[str, object] = {}


def _dce_default(used_outputs, eqn, stats):
    rule = ir.dce_rule(eqn.primitive)
    if rule is None or ir.contains_unknown(eqn):
        return [True] * len(eqn.invars), eqn
    used_inputs, new_eqn = rule(list(used_outputs), eqn)
    if new_eqn is not None and len(new_eqn.outvars) < len(eqn.outvars):
        stats.hit(f"dce.{eqn.primitive.name}_outputs", len(eqn.outvars) - len(new_eqn.outvars))
    return used_inputs, new_eqn


def _dce_while(used_outputs, eqn, stats):
    """Drop carries of a while loop that neither the result, the predicate nor another
    needed carry reads. Identity: such a carry's value never reaches anything observable."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]
    n_carry = len(eqn.outvars)
    if ir.effectful(eqn) or ir.contains_unknown(eqn):
        return [True] * len(eqn.invars), eqn
    cond_reads = _used_invars(cond.jaxpr)[cn:]
    needed = [u or c for u, c in zip(used_outputs, cond_reads)]
    while True:
        _, used_in = ir.dce_jaxpr(body.jaxpr, needed)
        new_needed = [n or u for n, u in zip(needed, used_in[bn:])]
        if new_needed == needed:
            break
        needed = new_needed
    if all(needed):
        return [True] * len(eqn.invars), eqn
    new_body, used_in = ir.dce_jaxpr(body.jaxpr, needed, instantiate=True)
    # Keep the carry positions for needed carries even where the body ignores them.
    keep_body_consts = used_in[:bn]
    body_invars = ([v for v, k in zip(body.jaxpr.invars[:bn], keep_body_consts) if k]
                   + [v for v, k in zip(body.jaxpr.invars[bn:], needed) if k])
    new_body = ir.make_jaxpr_from(new_body, invars=body_invars)
    cond_used = _used_invars(cond.jaxpr)
    keep_cond_consts = cond_used[:cn]
    cond_invars = ([v for v, k in zip(cond.jaxpr.invars[:cn], keep_cond_consts) if k]
                   + [v for v, k in zip(cond.jaxpr.invars[cn:], needed) if k])
    new_cond = ir.make_jaxpr_from(cond.jaxpr, invars=cond_invars)
    ins = eqn.invars
    used_inputs = list(keep_cond_consts) + list(keep_body_consts) + list(needed)
    new_params = dict(p, cond_nconsts=sum(keep_cond_consts), body_nconsts=sum(keep_body_consts),
                      cond_jaxpr=ir.closed(new_cond, cond.consts),
                      body_jaxpr=ir.closed(new_body, body.consts))
    new_eqn = eqn.replace(invars=[v for v, k in zip(ins, used_inputs) if k],
                          outvars=[v for v, k in zip(eqn.outvars, needed) if k],
                          params=new_params)
    stats.hit("dce.while_carries", n_carry - sum(needed))
    return used_inputs, new_eqn


DCE_RULES["while"] = _dce_while


def _used_invars(jaxpr) -> list[bool]:
    used = {v for e in jaxpr.eqns for v in e.invars if ir.is_var(v)}
    used |= {v for v in jaxpr.outvars if ir.is_var(v)}
    return [v in used for v in jaxpr.invars]


def _dce_closed(cj: ir.ClosedJaxpr, stats: Stats, allow_consts=True) -> ir.ClosedJaxpr:
    jaxpr = cj.jaxpr
    live = {v for v in jaxpr.outvars if ir.is_var(v)}
    kept = []
    changed = False
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name not in ir.known_primitives():
            stats.unknown[eqn.primitive.name] += 1  # passed through, counted like other passes do
        used = [ir.is_var(v) and v in live for v in eqn.outvars]
        if not any(used) and ir.removable_if_dead(eqn):
            stats.hit("dce.eqn")
            changed = True
            continue
        if ir.has_subjaxprs(eqn) and eqn.primitive.name in ir.known_primitives():
            new = ir.map_subjaxprs(eqn, lambda j, is_open: _dce_closed(j, stats))
            rule = DCE_RULES.get(new.primitive.name, _dce_default)
            _, pruned = rule(used, new, stats)
            if pruned is None:  # JAX's rule says the whole equation is dead
                stats.hit("dce.eqn")
                changed = True
                continue
            if len(pruned.outvars) == len(new.outvars) and len(pruned.invars) == len(new.invars):
                pruned = new  # JAX's rules rebuild the equation even when nothing was pruned
            if pruned is not eqn:
                changed = True
            eqn = pruned  # its inputs are exactly the ones the kept outputs need
        live.update(v for v in eqn.invars if ir.is_var(v))
        kept.append(eqn)
    keep_consts = [v in live for v in jaxpr.constvars]
    if not all(keep_consts):
        changed = True
        stats.hit("dce.const", keep_consts.count(False))
    if not changed:
        return cj
    kept.reverse()
    new = ir.make_jaxpr_from(
        jaxpr, eqns=kept, constvars=[v for v, k in zip(jaxpr.constvars, keep_consts) if k])
    return ir.closed(new, [c for c, k in zip(cj.consts, keep_consts) if k])


def dce(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Dead-code elimination, nested jaxprs and loop carries included."""
    stats = Stats()
    out = _dce_closed(cj, stats)
    return PassResult(out, out is not cj, stats)


# ================================================================ constant folding

FOLD_MAX_BYTES = 64 * 1024
# Layout ops that only repeat a constant: folding them would materialize big constants.
_NO_FOLD = frozenset({"broadcast_in_dim", "iota", "full"})


def _const_value(rw: Rewriter, atom):
    if ir.is_literal(atom):
        return ir.literal_value(atom)
    return rw.state.known_consts.get(atom, _MISSING)


_MISSING = object()


def _np_broadcast(x, shape, broadcast_dimensions, **_):
    expanded = np.reshape(x, [shape[i] if i in broadcast_dimensions else 1 for i in range(len(shape))]
                          ) if np.ndim(x) else x
    return np.broadcast_to(expanded, shape)


# Exact NumPy evaluations (IEEE results identical to XLA's) that skip compiling a tiny
# XLA program per folded equation; anything else is evaluated by binding the primitive.
NUMPY_EVAL = {
    "add": lambda x, y, **_: x + y, "sub": lambda x, y, **_: x - y,
    "mul": lambda x, y, **_: x * y, "neg": lambda x, **_: -x,
    "max": lambda x, y, **_: np.maximum(x, y), "min": lambda x, y, **_: np.minimum(x, y),
    "eq": lambda x, y, **_: x == y, "ne": lambda x, y, **_: x != y,
    "lt": lambda x, y, **_: x < y, "le": lambda x, y, **_: x <= y,
    "gt": lambda x, y, **_: x > y, "ge": lambda x, y, **_: x >= y,
    "and": lambda x, y, **_: x & y, "or": lambda x, y, **_: x | y, "not": lambda x, **_: ~x,
    "broadcast_in_dim": lambda x, shape, broadcast_dimensions, **_: _np_broadcast(
        x, shape, broadcast_dimensions),
    # lax.reshape's ``dimensions`` transposes first (a conv transpose emits one)
    "reshape": lambda x, new_sizes, dimensions=None, **_: np.reshape(
        x if dimensions is None else np.transpose(x, dimensions), new_sizes),
    "transpose": lambda x, permutation, **_: np.transpose(x, permutation),
    "select_n": lambda p, *cases, **_: np.choose(np.asarray(p, np.int32), cases),
}


def _evaluate(eqn, vals) -> list:
    """Concrete outputs of a pure equation on constant inputs."""
    fn = NUMPY_EVAL.get(eqn.primitive.name)
    if fn is not None:
        ins = [np.asarray(v, dtype=a.aval.dtype) for v, a in zip(vals, eqn.invars)]
        out = fn(*ins, **eqn.params)
        return [np.asarray(out, dtype=eqn.outvars[0].aval.dtype)]
    with jax.ensure_compile_time_eval():
        res = eqn.primitive.bind(*vals, **eqn.params)
    return list(res) if eqn.primitive.multiple_results else [res]


# Primitives whose value depends on the mapped axis they run under (shard_map, pmap):
# evaluated outside it they fail or mean something else, so they are never folded.
_AXIS_DEPENDENT = frozenset({
    "pvary", "psum", "pmax", "pmin", "pmean", "psum_invariant", "axis_index", "all_gather",
    "all_gather_invariant", "ppermute", "pbroadcast", "all_to_all", "reduce_scatter",
    "psum_scatter", "pshuffle", "pcast", "pgather"})


def _fold_default(rw: Rewriter, eqn):
    if ir.impure(eqn) or ir.has_subjaxprs(eqn) or not eqn.outvars \
            or eqn.primitive.name in _AXIS_DEPENDENT:
        return None
    vals = [_const_value(rw, a) for a in eqn.invars]
    if any(v is _MISSING for v in vals):
        return None
    avals = [v.aval for v in eqn.outvars]
    if any(not ir.is_array_aval(a) for a in avals):
        return None
    if sum(ir.aval_nbytes(a) for a in avals) > rw.state.max_bytes:
        return None
    try:
        res = _evaluate(eqn, vals)
    except Exception as exc:  # a primitive that cannot run on its own here stays as it is
        rw.stats.note(f"fold: kept {eqn.primitive.name}: evaluating it failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return None
    if eqn.primitive.name in _NO_FOLD and any(np.prod(a.shape) > 1 for a in avals):
        # Keep the cheap broadcast, but let its consumers fold; DCE drops it if they all do.
        for v, r in zip(eqn.outvars, res):
            rw.state.known_consts[v] = np.asarray(r)
        return None
    outs = []
    for v, r in zip(eqn.outvars, res):
        arr = np.asarray(r)
        atom = rw.const(arr if arr.ndim else arr.dtype.type(arr), v.aval)
        if ir.is_var(atom):
            rw.state.known_consts[atom] = arr
        outs.append(atom)
    rw.hit(f"fold.{eqn.primitive.name}")
    return outs


@dataclasses.dataclass
class _FoldState:
    """One level's fold state: the size cap, the values known so far (var -> array)."""
    max_bytes: int
    known_consts: dict


# Every pure primitive folds the same way (evaluate it), so the default does the work.
FOLD = RuleTable("fold", default=_fold_default)


def fold(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Constant folding with a size cap (``fold_max_bytes`` option)."""
    stats = Stats()
    cap = ctx.option("fold_max_bytes", FOLD_MAX_BYTES) if ctx else FOLD_MAX_BYTES

    def state(rw: Rewriter, level: ir.ClosedJaxpr) -> _FoldState:
        # Small closed-over arrays count as constants; big ones stay symbolic.
        return _FoldState(cap, {v: np.asarray(c) for v, c in zip(level.jaxpr.constvars,
                                                                  level.consts)
                                if ir.aval_nbytes(v.aval) <= cap})

    out = rewrite(cj, FOLD, stats, state=state)
    return PassResult(out, out is not cj, stats)


# ====================================================================== CSE

def _param_key(v):
    if isinstance(v, (ir.Jaxpr, ir.ClosedJaxpr)):
        return ("jaxpr", id(v))
    if isinstance(v, (tuple, list)):
        return tuple(_param_key(x) for x in v)
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    hash(v)  # raises TypeError for unhashable params: the equation is then not merged
    return v


def _atom_key(a):
    if isinstance(a, ir.Var):
        return a
    # Raw bytes keep -0.0 apart from 0.0 (x + -0.0 and x + 0.0 differ at x = -0.0).
    return ("lit", np.asarray(ir.literal_value(a), a.aval.dtype).tobytes(), a.aval.dtype,
            getattr(a.aval, "weak_type", False))




def _contains_impure(eqn) -> bool:
    """A higher-order equation whose body holds a random or effectful equation."""
    return any(ir.impure(e) for _, _, sub in ir.subjaxpr_params(eqn) for e, _, _ in ir.walk_eqns(sub))


def _cse_default(rw: Rewriter, eqn):
    if ir.impure(eqn) or not eqn.outvars or _contains_impure(eqn):
        return None
    ins = tuple(_atom_key(a) for a in eqn.invars)
    try:
        # Fast path: params hash as they are (jaxpr params hash by identity).
        key = (eqn.primitive.name, ins, tuple(eqn.params.items()))
        hash(key)
    except TypeError:
        try:
            key = (eqn.primitive.name, ins,
                   tuple(sorted((k, _param_key(v)) for k, v in eqn.params.items())))
            hash(key)
        except TypeError:
            return None
    seen = rw.state  # this level's (primitive, inputs, params) -> outputs
    prev = seen.get(key)
    if prev is None:
        # An equation with a dropped output cannot stand for a later one that is read.
        if not any(ir.is_dropvar(v) for v in eqn.outvars):
            seen[key] = eqn.outvars
        return None
    rw.hit(f"cse.{eqn.primitive.name}")
    return list(prev)


CSE = RuleTable("cse", default=_cse_default)


def cse(cj: ir.ClosedJaxpr, ctx: PassContext | None = None) -> PassResult:
    """Common-subexpression elimination, one table per jaxpr level."""
    stats = Stats()

    out = rewrite(cj, CSE, stats, state=lambda rw, level: {})
    return PassResult(out, out is not cj, stats)


# ==================================================================== registration

# Removing dead equations leaves every live one as it was: nothing new to fold, merge or
# simplify (the fusions do gain: a dead reader no longer keeps an intermediate public).
_AFTER_DCE = frozenset({"dce"})
register_pass(Pass("dce", dce, "dead-code elimination (also unused outputs/carries)", "prune"))
register_pass(Pass("fold", fold, "constant folding under a size cap", "prune",
                   unaffected_by=_AFTER_DCE))
register_pass(Pass("cse", cse, "common-subexpression elimination", "prune",
                   unaffected_by=_AFTER_DCE))
register_pass(Pass("simplify", simplify, "exact algebraic simplification", "prune",
                   unaffected_by=_AFTER_DCE))
register_group("prune", ["fold", "simplify", "cse", "dce"])

__all__ = ["dce", "fold", "cse", "simplify", "DCE_RULES", "FOLD", "CSE", "SIMPLIFY"]
