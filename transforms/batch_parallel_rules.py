"""Rule table and per-platform cost model of the ``batch_parallel`` pass.

:data:`RULES` says, per primitive, whether a pack of equations may become one batched
(``jax.vmap``-ed) equation; the explicit default (:func:`default_rule`) batches any pure
primitive JAX itself defines and refuses the rest. :func:`estimate` prices a set of
packs before and after batching on one platform.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from graphopt import ir
from graphopt.cost import eqn_cost

BATCH = None  # a rule returning None: the pack may be batched

# Primitives refused, with the reason the report gives.
_REFUSED = {
    "custom_vjp_call": "its differentiation rule cannot be compared across branches",
    "custom_vjp_call_jaxpr": "its differentiation rule cannot be compared across branches",
    "while": "a batched loop would run every lane until the longest one stops",
    "cond": "a batched predicate would compute every branch",
    "shard_map": "a per-device body: batching would change what each device runs",
    "sharding_constraint": "it pins a sharding that batching would change",
    "mesh_cast": "it pins a sharding that batching would change",
    "reshard": "it pins a sharding that batching would change",
    "device_put": "it places data on devices",
    "psum": "a collective", "pmax": "a collective", "pmin": "a collective",
    "all_gather": "a collective", "all_to_all": "a collective", "ppermute": "a collective",
    "psum_scatter": "a collective", "axis_index": "a collective",
    "optimization_barrier": "a fence other passes placed on purpose",
}


def default_rule_no_callables(eqn) -> str | None:
    """:func:`default_rule` where Python-function params are fine (the caller handles them)."""
    name = eqn.primitive.name
    if ir.impure(eqn):
        return "effectful or random"
    if name not in ir.known_primitives() and not ir.has_subjaxprs(eqn):
        return "unknown primitive"
    if ir.has_subjaxprs(eqn) and ir.contains_unknown(eqn):
        return "holds an unknown primitive"
    if any(eqn.params.get(k) is not None for k in ("sharding", "out_sharding")):
        return "an explicit sharding that batching would change"
    return BATCH


def default_rule(eqn) -> str | None:
    """None (batch it) for a pure primitive JAX defines; else why not."""
    if any((callable(v) or hasattr(v, "call_wrapped")) and not isinstance(v, (ir.Jaxpr, ir.ClosedJaxpr))
           for v in eqn.params.values()):
        return "a Python function parameter that cannot be compared across branches"
    return default_rule_no_callables(eqn)


def _custom_jvp(eqn) -> str | None:
    """Batched with each lane's own rule for the derivative: needs float operands."""
    if not all(jnp.issubdtype(a.aval.dtype, jnp.floating) for a in [*eqn.invars, *eqn.outvars]):
        return "non-float operands of a custom_jvp call"
    return default_rule_no_callables(eqn)


RULES: dict = {name: (lambda eqn, why=why: why) for name, why in _REFUSED.items()}
RULES["custom_jvp_call"] = _custom_jvp


def refusal(eqn) -> str | None:
    """Why ``eqn`` cannot be part of a batched pack (None: it can)."""
    return RULES.get(eqn.primitive.name, default_rule)(eqn)


# ----------------------------------------------------------------------- cost model

@dataclasses.dataclass(frozen=True)
class Platform:
    """What one equation costs on a platform: a launch (kernels only), FLOPs and bytes."""
    launch_s: float      # per kernel (GPU launch, CPU thunk)
    flops_per_s: float
    bytes_per_s: float
    batched_dot_eff: float  # a batched dot_general's speed relative to k separate ones
    kernels: frozenset = frozenset()  # primitives that stay an op of their own there


# Measured here: on CPU an ensemble of 8 small MLPs vmapped by hand runs 0.8-0.9x the
# loop (XLA CPU runs ops back to back with little overhead; its batched dots are slower);
# a GPU pays a launch per small kernel, which batching saves k-1 times.
# Primitives that are kernels of their own on a GPU: XLA fuses elementwise ops,
# broadcasts and reshapes into their neighbours, so batching those saves no launch.
KERNELS = frozenset({
    "dot_general", "conv_general_dilated", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin", "cumsum", "cumprod",
    "cummax", "cummin", "cumlogsumexp", "sort", "scatter", "scatter-add", "scatter_add",
    "gather", "fft", "reduce_window_sum", "reduce_window_max", "select_and_scatter_add",
    "triangular_solve", "cholesky", "lu", "qr", "eigh", "svd", "top_k",
})
# XLA CPU also fuses reductions into its loops: only library calls stay ops of their own.
CPU_KERNELS = frozenset({"dot_general", "conv_general_dilated", "sort", "fft",
                         "triangular_solve", "cholesky", "lu", "qr", "eigh", "svd", "top_k"})

PLATFORMS = {
    "cpu": Platform(launch_s=0.3e-6, flops_per_s=50e9, bytes_per_s=10e9, batched_dot_eff=0.8,
                    kernels=CPU_KERNELS),
    "gpu": Platform(launch_s=5e-6, flops_per_s=50e12, bytes_per_s=2e12, batched_dot_eff=1.0,
                    kernels=KERNELS),
}
PLATFORMS["cuda"] = PLATFORMS["rocm"] = PLATFORMS["gpu"]


def platform(name: str) -> Platform:
    return PLATFORMS.get(name, PLATFORMS["cpu"])


def eqn_time(eqn, plat: Platform, k: int = 1, batched: bool = False) -> float:
    """Seconds for k copies of ``eqn``, as k equations or one batched one."""
    c = eqn_cost(eqn)
    work = k * (c.flops / plat.flops_per_s + c.bytes / plat.bytes_per_s)
    if batched and eqn.primitive.name == "dot_general":
        work /= plat.batched_dot_eff
    kernel = eqn.primitive.name in plat.kernels or ir.has_subjaxprs(eqn)
    launches = (1 if batched else k) if kernel else 0
    return launches * plat.launch_s + work


def pack_times(eqn, k: int, copy_bytes: int, n_copies: int, plat: Platform) -> tuple[float, float]:
    """(seconds as written, seconds batched) of a pack of k copies of ``eqn`` whose
    batching makes ``n_copies`` copy ops (a stack of operands, a split-out result: each
    an op of its own) of ``copy_bytes`` in all (read and written)."""
    return (eqn_time(eqn, plat, k), eqn_time(eqn, plat, k, batched=True)
            + n_copies * plat.launch_s + 2 * copy_bytes / plat.bytes_per_s)


__all__ = ["RULES", "default_rule", "refusal", "PLATFORMS", "KERNELS", "Platform", "platform",
           "pack_times", "eqn_time"]
