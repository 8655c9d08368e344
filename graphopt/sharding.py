"""Where the inputs of a call live: the shardings graphopt keeps through its passes.

graphopt traces on shapes; which devices hold an input is the array's own business (JAX
places the optimized program as it would place ``jax.jit``'s). Two things need it:
the cache (a program rematerialized for inputs sharded over 8 devices is planned per
device, so another placement is another entry) and the remat pass (its budget is per
device: XLA compiles the SPMD program for one device's share). Inside ``jax.shard_map``
the inputs vary along mesh axes, and graphopt traces them as such (:func:`trace_specs`).
"""
from __future__ import annotations

import contextvars

import jax

from graphopt import ir
from graphopt.errors import GraphoptError


def placement(leaves) -> tuple | None:
    """Per flat input, its sharding where it spans several devices (else None); None
    when no input does (tracers and host arrays have no placement of their own)."""
    out = tuple(x.sharding if isinstance(x, jax.Array) and not ir.is_tracer(x)
                and len(x.sharding.device_set) > 1 else None for x in leaves)
    return out if any(s is not None for s in out) else None


# The placement of the call being traced: under jax.jit graphopt sees tracers, which do
# not say where the concrete arrays live; the caller records it before tracing.
_CALLER: contextvars.ContextVar = contextvars.ContextVar("graphopt_placement", default=None)


def of(leaves) -> tuple | None:
    """The placement of ``leaves``: their own, or the caller's when they are tracers."""
    if any(ir.is_tracer(x) for x in leaves):
        return _CALLER.get()
    return placement(leaves)


class PerPlacement:
    """One jitted callable per placement of the inputs, for programs planned per device
    (a remat budget); jax.jit itself would retrace nothing when only shardings change."""

    def __init__(self, make):
        self._make, self._fns = make, {}

    def __call__(self, leaves, *args, **kwargs):
        pl = of(leaves)
        fn = self._fns.get(pl)
        if fn is None:
            fn = self._fns[pl] = self._make()
        token = _CALLER.set(pl)
        try:
            return fn(*args, **kwargs)
        finally:
            _CALLER.reset(token)


def varying(leaves) -> tuple | None:
    """Per flat input, the ``shard_map`` mesh axes it varies along (None: none does)."""
    out = tuple(ir.varying_axes(x) if ir.is_tracer(x) else frozenset() for x in leaves)
    return out if any(out) else None


def trace_specs(specs, leaves, axes: tuple | None, name: str) -> list:
    """``specs`` with the inputs that vary along ``shard_map`` mesh axes (``axes``, from
    :func:`varying`) traced as such: graphopt traces on shapes, and a value that varies
    meeting a constant that does not needs the ``pvary`` JAX inserts inside the map."""
    if axes is None:
        return specs
    out = []
    for spec, x, ax in zip(specs, leaves, axes):
        if ax:
            spec = ir.per_device_spec(x)
            if spec is None:
                raise GraphoptError(
                    f"graphopt.optimize({name}) is called inside jax.shard_map on values "
                    f"that vary along mesh axes {sorted(ax)}, which this "
                    f"JAX cannot trace outside the map. Put graphopt.optimize around the "
                    f"jax.shard_map call (its body is kept), or pass check_vma=False")
        out.append(spec)
    return out


__all__ = ["placement", "of", "PerPlacement", "varying", "trace_specs"]
