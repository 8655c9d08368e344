"""Sub-jaxprs: finding, mapping and walking the jaxprs nested in an equation's params
(jit, cond, while, scan, custom_jvp/vjp, remat, shard_map)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from .compat import ClosedJaxpr, Jaxpr, JaxprEqn, is_open_subjaxpr


def _is_jaxpr_like(v) -> bool:
    return isinstance(v, (Jaxpr, ClosedJaxpr))


def subjaxpr_params(eqn) -> Iterator[tuple[str, int | None, Jaxpr | ClosedJaxpr]]:
    """(param name, index in a tuple param or None, sub-jaxpr) of every sub-jaxpr."""
    for key, val in eqn.params.items():
        if _is_jaxpr_like(val):
            yield key, None, val
        elif isinstance(val, (tuple, list)) and val and all(_is_jaxpr_like(v) for v in val):
            for i, v in enumerate(val):
                yield key, i, v


_HAS_SUBJAXPRS: dict = {}


def has_subjaxprs(eqn) -> bool:
    # Whether a primitive carries sub-jaxprs is fixed per primitive: cache it (hot path).
    prim = eqn.primitive
    got = _HAS_SUBJAXPRS.get(prim)
    if got is None:
        got = _HAS_SUBJAXPRS[prim] = next(subjaxpr_params(eqn), None) is not None
    return got


def as_closed(j) -> ClosedJaxpr:
    return j if isinstance(j, ClosedJaxpr) else ClosedJaxpr(j, [])


def map_subjaxprs(eqn, fn: Callable[[ClosedJaxpr, bool], ClosedJaxpr]) -> JaxprEqn:
    """``eqn`` with every sub-jaxpr ``j`` replaced by ``fn(closed j, is_open)``.

    ``is_open`` tells ``fn`` that the param holds an open :class:`Jaxpr` (remat,
    shard_map, ...): its result must then have no consts, because the equation has no
    place to feed them.
    """
    new_params = None
    for key, idx, sub in list(subjaxpr_params(eqn)):
        is_open = is_open_subjaxpr(eqn, key, sub)
        out = fn(as_closed(sub), is_open)
        if is_open:
            if out.consts:
                raise ValueError(f"rewrite of open sub-jaxpr {key!r} of {eqn.primitive} "
                                 "introduced constants")
            out = out.jaxpr
        if out is sub:
            continue
        if new_params is None:
            new_params = dict(eqn.params)
        if idx is None:
            new_params[key] = out
        else:
            seq = list(new_params[key])
            seq[idx] = out
            new_params[key] = type(eqn.params[key])(seq)
    if new_params is None:
        return eqn
    return eqn.replace(params=new_params)


def trip_count(eqn) -> float:
    """How often the sub-jaxprs of ``eqn`` run per execution of ``eqn`` (for costs).

    ``scan`` runs ``length`` times; a ``while`` loop's count is unknown statically and
    counts once (the report says so); ``cond`` branches count once each (callers take
    the max over branches).
    """
    if eqn.primitive.name == "scan":
        return float(eqn.params["length"])
    return 1.0


def walk_eqns(jaxpr: Jaxpr | ClosedJaxpr, weight: float = 1.0, depth: int = 0
              ) -> Iterator[tuple[JaxprEqn, float, int]]:
    """Every equation, nested ones included, with its trip-count weight and depth."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for e in jaxpr.eqns:
        yield e, weight, depth
        w = weight * trip_count(e)
        for _, _, sub in subjaxpr_params(e):
            yield from walk_eqns(sub, w, depth + 1)


def count_eqns(jaxpr, nested: bool = True) -> int:
    """Number of equations, nested sub-jaxprs included when ``nested``."""
    if not nested:
        return len((jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr).eqns)
    return sum(1 for _ in walk_eqns(jaxpr))


def primitive_counts(jaxpr) -> dict[str, int]:
    """How often each primitive occurs, nested equations included."""
    out: dict[str, int] = {}
    for e, _, _ in walk_eqns(jaxpr):
        out[e.primitive.name] = out.get(e.primitive.name, 0) + 1
    return out
