"""The FLOP and transcendental rule tables of the cost model, per primitive, with an
explicit default for primitives they do not list (priced by output size, and reported).
The primitive classes they price alike come from :mod:`graphopt.primitives`."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

import jax

from . import ir, primitives

# ------------------------------------------------------------------- small helpers

def _jaxpr_of(j):
    return j.jaxpr if isinstance(j, ir.ClosedJaxpr) else j


def _elems(aval) -> int:
    """Number of elements of an array aval (0 for tokens and other non-arrays)."""
    if not ir.is_array_aval(aval):
        return 0
    return int(np.prod(aval.shape, dtype=np.int64))


def _out_elems(eqn) -> int:
    return sum(_elems(v.aval) for v in eqn.outvars)


def _in_elems(eqn, i: int = 0) -> int:
    return _elems(eqn.invars[i].aval) if len(eqn.invars) > i else 0


def _is_complex(aval) -> bool:
    return ir.is_array_aval(aval) and jax.dtypes.issubdtype(aval.dtype, np.complexfloating)


# ------------------------------------------------------------------ FLOP rule table

def _zero(eqn) -> float:
    return 0.0


def _per_out_elem(eqn) -> float:
    return float(_out_elems(eqn))


def _per_in_elem(eqn) -> float:
    return float(_in_elems(eqn))


def _dot_general_flops(eqn) -> float:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs.shape[d] for d in lb)
    k = math.prod(lhs.shape[d] for d in lc)
    m = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
    # a complex multiply-add is 4 real multiplies and 4 adds
    scale = 4.0 if _is_complex(lhs) or _is_complex(rhs) else 1.0
    return 2.0 * batch * m * n * k * scale


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    dn = eqn.params.get("dimension_numbers")
    rhs_spec = getattr(dn, "rhs_spec", None) or tuple(range(len(rhs.shape)))
    # the kernel's in-feature dim already is in_features / feature_group_count
    in_feat = rhs.shape[rhs_spec[1]]
    spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * _out_elems(eqn) * spatial * in_feat


def _integer_pow_flops(eqn) -> float:
    y = int(eqn.params["y"])
    a = abs(y)
    # square-and-multiply: (bit_length - 1) squarings + (popcount - 1) multiplies
    muls = max(a.bit_length() - 1, 0) + max(bin(a).count("1") - 1, 0)
    return float(_out_elems(eqn) * (muls + (1 if y < 0 else 0)))


def _combiner_size(eqn) -> int:
    """Equations in a reduce/scatter combiner jaxpr (at least 1 op per combine)."""
    n = 0
    for _, _, sub in ir.subjaxpr_params(eqn):
        n = max(n, len(_jaxpr_of(sub).eqns))
    return max(n, 1)


def _window(eqn) -> int:
    return math.prod(eqn.params.get("window_dimensions", (1,)))


def _reduce_flops(eqn) -> float:
    # generic reduce: every input element goes through the combiner once
    n_in = sum(_elems(v.aval) for v in eqn.invars[: len(eqn.invars) // 2])
    return float(n_in * _combiner_size(eqn))


def _reduce_window_flops(eqn) -> float:
    return float(_out_elems(eqn) * _window(eqn))


def _reduce_window_generic_flops(eqn) -> float:
    return float(_out_elems(eqn) * _window(eqn) * _combiner_size(eqn))


def _scatter_combine_flops(eqn) -> float:
    # one combine per update element (operands: operand, indices, updates)
    return float(_in_elems(eqn, 2))


def _select_and_scatter_flops(eqn) -> float:
    return float(_in_elems(eqn, 0) * _window(eqn))


def _sort_flops(eqn) -> float:
    aval = eqn.invars[0].aval
    dim = aval.shape[eqn.params.get("dimension", -1)] if aval.shape else 1
    # a comparison sort: n log2(n) compares per sorted row
    return float(_elems(aval) * max(math.ceil(math.log2(max(dim, 2))), 1))


def _top_k_flops(eqn) -> float:
    k = int(eqn.params.get("k", 1))
    return float(_in_elems(eqn) * max(math.ceil(math.log2(max(k, 2))), 1))


def _fft_flops(eqn) -> float:
    lengths = eqn.params.get("fft_lengths", ())
    n = math.prod(lengths) if lengths else 1
    batch = max(_in_elems(eqn), _out_elems(eqn)) / max(n, 1)
    # the classic radix-2 estimate: 5 N log2 N real flops per complex transform
    return 5.0 * n * math.log2(max(n, 2)) * batch


def _cholesky_flops(eqn) -> float:
    shape = eqn.invars[0].aval.shape
    n = shape[-1]
    return math.prod(shape[:-2]) * n ** 3 / 3.0


def _lu_flops(eqn) -> float:
    shape = eqn.invars[0].aval.shape
    m, n = shape[-2], shape[-1]
    k = min(m, n)
    # LU of an m x n matrix: m n k - (m + n) k^2 / 2 + k^3 / 3 multiply-adds, times 2
    return math.prod(shape[:-2]) * 2.0 * (m * n * k - (m + n) * k * k / 2 + k ** 3 / 3)


def _triangular_solve_flops(eqn) -> float:
    a = eqn.invars[0].aval.shape
    b = eqn.invars[1].aval.shape
    m = a[-1]
    rhs = b[-1] if eqn.params.get("left_side", False) else b[-2]
    # back substitution: m^2 multiply-adds per right-hand side
    return math.prod(b[:-2]) * float(m * m * rhs)


def _clamp_flops(eqn) -> float:
    return 2.0 * _out_elems(eqn)  # a max and a min per element


FLOP_RULES: dict[str, Callable[[Any], float]] = {}
FLOP_RULES.update({p: _per_out_elem for p in primitives.ARITHMETIC | primitives.TRANSCENDENTAL})
FLOP_RULES.update({p: _zero for p in primitives.DATA_MOVEMENT})
FLOP_RULES.update({p: _per_in_elem for p in primitives.REDUCTIONS})
FLOP_RULES.update({
    "dot_general": _dot_general_flops,
    "conv_general_dilated": _conv_flops,
    "integer_pow": _integer_pow_flops,
    "clamp": _clamp_flops,
    "reduce": _reduce_flops,
    "reduce_window_sum": _reduce_window_flops,
    "reduce_window_max": _reduce_window_flops,
    "reduce_window_min": _reduce_window_flops,
    "reduce_window": _reduce_window_generic_flops,
    "select_and_gather_add": _reduce_window_flops,
    "select_and_scatter_add": _select_and_scatter_flops,
    "select_and_scatter": _select_and_scatter_flops,
    "scatter-add": _scatter_combine_flops,
    "scatter_add": _scatter_combine_flops,
    "scatter-mul": _scatter_combine_flops,
    "scatter_mul": _scatter_combine_flops,
    "scatter-min": _scatter_combine_flops,
    "scatter_min": _scatter_combine_flops,
    "scatter-max": _scatter_combine_flops,
    "scatter_max": _scatter_combine_flops,
    "scatter_apply": _scatter_combine_flops,
    "sort": _sort_flops,
    "top_k": _top_k_flops,
    "fft": _fft_flops,
    "cholesky": _cholesky_flops,
    "lu": _lu_flops,
    "triangular_solve": _triangular_solve_flops,
})


def default_flop_rule(eqn) -> float:
    """Unknown primitive: guess one flop per output element (and report the name)."""
    return float(_out_elems(eqn))


TRANSCENDENTAL_RULES: dict[str, Callable[[Any], float]] = {
    p: _per_out_elem for p in primitives.TRANSCENDENTAL}
# log-sum-exp along a scan: an exp and a log per input element
TRANSCENDENTAL_RULES["cumlogsumexp"] = lambda eqn: 2.0 * _in_elems(eqn)


def default_transcendental_rule(eqn) -> float:
    """Primitives not in :data:`TRANSCENDENTAL_RULES` evaluate no transcendentals."""
    return 0.0


# Primitives whose sub-jaxprs are per-element combiners (folded into the FLOP rule
# above), not sub-programs that run as a whole.
COMBINER_PRIMITIVES = frozenset({
    "reduce", "reduce_window", "select_and_scatter", "select_and_scatter_add",
    "scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
    "scatter_min", "scatter-max", "scatter_max", "scatter_apply", "argmax", "argmin",
    "sort",
})


def is_higher_order(eqn) -> bool:
    """True if ``eqn`` runs sub-jaxprs as programs (jit, cond, scan, while, remat, ...)."""
    return ir.prim_name(eqn) not in COMBINER_PRIMITIVES and ir.has_subjaxprs(eqn)
