"""Where values live: ``shard_map`` varying axes and calls that pin shardings, layouts
or donation (the attribute names differ between JAX releases)."""
from __future__ import annotations

import jax

from .atoms import aval_of


def varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``jax.shard_map`` (empty elsewhere):
    ``manual_axis_type.varying`` in JAX 0.10-0.12, ``vma`` in earlier releases."""
    aval = aval_of(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()) or ())
    return frozenset(getattr(aval, "vma", ()) or ())


def per_device_spec(x):
    """A ``jax.ShapeDtypeStruct`` of a value inside ``jax.shard_map`` that keeps the mesh
    axes it varies along, so a trace from it inserts the ``pvary`` JAX's own would; None
    where this JAX cannot say so."""
    aval = aval_of(x)
    try:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                    sharding=aval.sharding,
                                    manual_axis_type=aval.manual_axis_type)
    except (AttributeError, TypeError):
        return None


def pins_placement(eqn) -> bool:
    """True for a call (``jax.jit(..., in_shardings=, out_shardings=, donate_argnums=)``)
    whose params fix where its values live or which inputs it donates: inlining its body
    would drop them, so rewrites keep the call and work inside it."""
    p = eqn.params
    if any(isinstance(s, jax.sharding.Sharding)
           for k in ("in_shardings", "out_shardings") for s in p.get(k, ()) or ()):
        return True
    if any(la is not None for k in ("in_layouts", "out_layouts") for la in p.get(k, ()) or ()):
        return True
    return any(p.get("donated_invars", ()) or ())
