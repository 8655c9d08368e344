"""Primitive classes, one table that the cost model and the passes read: which primitives
compute per element, which are transcendental, which only move data, which reduce. A
primitive in no class is one a reader does not know: each reader has its explicit default
(price by output size, refuse to stream, refuse to follow a channel) and reports it."""
from __future__ import annotations

# Arithmetic, comparisons and bit operations: one operation per output element.
ARITHMETIC = frozenset("""
    add add_any sub mul div rem neg max min abs sign floor ceil round nextafter square
    one_minus_square eq ne lt le gt ge and or not xor shift_left shift_right_logical
    shift_right_arithmetic population_count clz select_n is_finite conj sqrt rsqrt cbrt pow
    fma fmuladd""".split())
# Transcendental functions: also one per output element (JAX 0.12 added the *pi ones).
TRANSCENDENTAL = frozenset("""
    exp exp2 expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh
    acosh atanh erf erfc erf_inv lgamma digamma igamma igammac igamma_grad_a
    random_gamma_grad bessel_i0e bessel_i1e polygamma zeta log2 log2p1 exp2m1 sinpi cospi
    tanpi asinpi acospi atanpi atan2pi regularized_incomplete_beta pow sqrt rsqrt
    cbrt""".split())
# Per element without arithmetic of their own (casts, copies, markers).
ELEMENTWISE_MOVES = frozenset("""
    convert_element_type reduce_precision copy copy_p stop_gradient real imag name
    clamp integer_pow""".split())
# Every primitive whose output element i reads only input elements i (same shapes).
ELEMENTWISE = ARITHMETIC | TRANSCENDENTAL | ELEMENTWISE_MOVES
COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
COMMUTATIVE = frozenset({"add", "add_any", "mul", "max", "min", "and", "or", "xor", "eq", "ne"})
# Layout and data movement: no arithmetic, only bytes.
DATA_MOVEMENT = frozenset("""
    reshape broadcast_in_dim transpose slice dynamic_slice dynamic_update_slice gather
    scatter concatenate pad squeeze expand_dims convert_element_type bitcast_convert_type
    reduce_precision rev iota copy copy_p device_put optimization_barrier
    sharding_constraint split real imag complex random_wrap random_unwrap stop_gradient
    mesh_cast reshard pvary axis_index all_gather all_to_all ppermute pbroadcast empty
    empty2""".split())
# Reductions and scans: one combine per input element.
REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax
    argmin cumsum cumprod cummax cummin cumlogsumexp psum pmax pmin reduce_scatter
    psum_scatter""".split())
DOTS = frozenset({"dot_general", "conv_general_dilated"})
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
# Bodies traced per device (their values carry the map's varying axes).
PER_DEVICE_BODIES = frozenset({"shard_map", "xla_pmap"})

__all__ = ["ARITHMETIC", "TRANSCENDENTAL", "ELEMENTWISE_MOVES", "ELEMENTWISE", "COMPARISONS",
           "COMMUTATIVE", "DATA_MOVEMENT", "REDUCTIONS", "DOTS", "CALLS", "PER_DEVICE_BODIES"]
