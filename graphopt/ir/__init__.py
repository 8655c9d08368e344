"""The one place graphopt touches JAX internals.

Everything else in graphopt (and every pass in ``graphopt.transforms``) reaches
jaxprs, variables, literals and equations through the names defined here, so a JAX
upgrade is this package's problem. Public ``jax.extend.core`` is preferred; the few
``jax._src`` names used are imported in one block in :mod:`graphopt.ir.compat`, each
with the reason, next to the shims that differ between JAX releases.

The package offers a read-only graph view over a jaxpr (:class:`Graph`, in ``graph``:
producers, users, topological order, source lines) and the small structural helpers
every rewrite needs: atoms and equation predicates (``atoms``), where values live
(``placement``), the sub-jaxpr walk (``subjaxprs``), building, running and inlining
jaxprs (``build``). Use them as ``from graphopt import ir; ir.X``.
"""
from __future__ import annotations

from . import atoms, build, compat, graph, placement, subjaxprs
from .compat import (
    Atom, ClosedJaxpr, DropVar, Jaxpr, JaxprEqn, JaxprTypeError, Literal, Primitive,
    ShapedArray, Var, _lowered_primitive_names, check,
    dce_jaxpr, dce_rule, eqn_with_name_stack, eval_jaxpr, is_checkpoint, is_open_subjaxpr,
    jaxpr_as_fun, name_stack, new_eqn, new_var, replace_scan, scan_layout, source_line,
)
from .atoms import (
    RANDOM_PRIMITIVES, aval_nbytes, aval_of, aval_str, effectful, impure,
    is_array_aval, is_dropvar, is_literal, is_tracer, is_var, literal, literal_value,
    prim_name, same_aval, scope_path,
)
from .placement import per_device_spec, pins_placement, varying_axes
from .subjaxprs import (
    as_closed, count_eqns, has_subjaxprs, map_subjaxprs,
    primitive_counts, subjaxpr_params, trip_count, walk_eqns,
)
from .build import (
    Inlined, bind_eqn, canonical_const, closed, copy_eqns, dce_same_interface,
    eqns_effects, inline, make_jaxpr_from, trace_flat,
)
from .graph import Graph

# ------------------------------------------------------------------ known primitives
# Kept in the package itself so ``ir._KNOWN_PRIMITIVES`` is the one set every reader sees.
# Primitives JAX itself defines (snapshot when graphopt is imported). Passes treat any
# other primitive as unknown: passed through untouched and counted in the report.
_KNOWN_PRIMITIVES = _lowered_primitive_names()


def known_primitives() -> set[str]:
    return _KNOWN_PRIMITIVES


def register_known_primitive(name: str) -> None:
    """Declare a user primitive pure: passes may then fold (evaluate) it on constants,
    merge two identical calls, and drop it when its result is unused."""
    _KNOWN_PRIMITIVES.add(name)


def contains_unknown(eqn) -> bool:
    """True if a sub-jaxpr of ``eqn`` (at any depth) holds a primitive graphopt does not know."""
    for _, _, sub in subjaxpr_params(eqn):
        if any(e.primitive.name not in _KNOWN_PRIMITIVES for e, _, _ in walk_eqns(sub)):
            return True
    return False


def removable_if_dead(eqn) -> bool:
    """May ``eqn`` be dropped when nothing reads its results? Never for effects, RNG or
    primitives graphopt does not know (at any depth): those pass through untouched."""
    if impure(eqn) or eqn.primitive.name not in _KNOWN_PRIMITIVES:
        return False
    return not (has_subjaxprs(eqn) and contains_unknown(eqn))


__all__ = [n for n in dir() if not n.startswith("_")
           and n not in ("annotations", "atoms", "build", "compat", "graph", "placement",
                         "subjaxprs")]
