"""Cost model: FLOPs and bytes, liveness and peak memory, XLA's own figures, parallelism.

Everything here reads a jaxpr and changes nothing; it knows no particular pass.

- :func:`eqn_cost` / :func:`program_cost` / :func:`cost_by_scope` — FLOPs,
  transcendentals and bytes moved, from a per-primitive rule table (:data:`FLOP_RULES`,
  :data:`TRANSCENDENTAL_RULES`) with an explicit default. Nested sub-jaxprs count,
  weighted by how often they run (scan: ``length``; while: once, and reported; cond:
  the costliest branch).
- :func:`liveness` / :func:`peak_memory` / :func:`memory_timeline` — which values are
  live along the jaxpr's own equation order, and an *estimate* of the temporary memory
  XLA would need (XLA fuses, reorders and reuses buffers, so its figure differs; compare
  with :func:`xla_memory` / :func:`estimate_vs_xla`).
- :func:`xla_memory` / :func:`xla_cost` — what XLA itself reports for the compiled
  program (``memory_analysis()``, ``cost_analysis()``).
- :func:`critical_path` / :func:`parallelism` / :func:`independent_branches` — the
  longest FLOP-weighted chain through the top-level dataflow graph and how much work
  could run beside it.
- :func:`fmt_bytes` / :func:`fmt_flops` — human units, reused by report and viz.

Only names from :mod:`graphopt.ir` reach jaxpr internals.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

import jax

from . import ir

# ------------------------------------------------------------------------ formatting

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_FLOP_UNITS = ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP")


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: ``fmt_bytes(1536 * 1024) == '1.5 MiB'``, ``'512 B'``."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in _BYTE_UNITS:
        if n < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_flops(n: float) -> str:
    """FLOPs in decimal (SI) units: ``fmt_flops(3.2e9) == '3.2 GFLOP'``, ``'12 FLOP'``."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in _FLOP_UNITS:
        if n < 1000 or unit == _FLOP_UNITS[-1]:
            return f"{sign}{n:.0f} {unit}" if unit == "FLOP" else f"{sign}{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ------------------------------------------------------------------- small helpers

def _elems(aval) -> int:
    """Number of elements of an array aval (0 for tokens and other non-arrays)."""
    if not ir.is_array_aval(aval):
        return 0
    return int(np.prod(aval.shape, dtype=np.int64))


def _nbytes(aval) -> int:
    """Bytes of a value; PRNG-key and other extended dtypes included (their itemsize)."""
    try:
        return ir.aval_nbytes(aval)
    except TypeError:  # np.dtype() refuses extended dtypes such as key<fry>
        return _elems(aval) * int(getattr(aval.dtype, "itemsize", 0))


def _out_elems(eqn) -> int:
    return sum(_elems(v.aval) for v in eqn.outvars)


def _in_elems(eqn, i: int = 0) -> int:
    return _elems(eqn.invars[i].aval) if len(eqn.invars) > i else 0


def _is_complex(aval) -> bool:
    return ir.is_array_aval(aval) and jax.dtypes.issubdtype(aval.dtype, np.complexfloating)


def _closed(j) -> ir.ClosedJaxpr:
    return ir.as_closed(j)


def _jaxpr_of(j):
    return j.jaxpr if isinstance(j, ir.ClosedJaxpr) else j


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


# Arithmetic done once per output element.
_ELEMENTWISE = (
    "add", "add_any", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign",
    "floor", "ceil", "round", "nextafter", "square", "eq", "ne", "lt", "le", "gt", "ge",
    "and", "or", "not", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "clz", "select_n", "is_finite", "conj",
    "sqrt", "rsqrt", "cbrt", "pow",
)
# Transcendental functions: one flop per output element plus a transcendental.
_TRANSCENDENTAL = (
    "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf",
    "erfc", "erf_inv", "lgamma", "digamma", "igamma", "igammac", "igamma_grad_a",
    "random_gamma_grad", "bessel_i0e", "bessel_i1e", "polygamma", "zeta",
    "regularized_incomplete_beta", "pow", "sqrt", "rsqrt", "cbrt",
)
# Layout and data movement: no arithmetic, only bytes.
_DATA_MOVEMENT = (
    "reshape", "broadcast_in_dim", "transpose", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter", "concatenate", "pad", "squeeze",
    "expand_dims", "convert_element_type", "bitcast_convert_type", "reduce_precision",
    "rev", "iota", "copy", "copy_p", "device_put", "optimization_barrier",
    "sharding_constraint", "split", "real", "imag", "complex", "random_wrap",
    "random_unwrap", "stop_gradient", "mesh_cast", "reshard", "pvary", "axis_index",
    "all_gather", "all_to_all", "ppermute", "pbroadcast", "empty", "empty2",
)
# Reductions and scans: one combine per input element.
_REDUCTIONS = (
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
    "cumlogsumexp", "psum", "pmax", "pmin", "reduce_scatter", "psum_scatter",
)

FLOP_RULES: dict[str, Callable[[Any], float]] = {}
FLOP_RULES.update({p: _per_out_elem for p in _ELEMENTWISE + _TRANSCENDENTAL})
FLOP_RULES.update({p: _zero for p in _DATA_MOVEMENT})
FLOP_RULES.update({p: _per_in_elem for p in _REDUCTIONS})
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
    p: _per_out_elem for p in _TRANSCENDENTAL}
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


# ------------------------------------------------------------------- equation cost

@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one equation (for a higher-order one: of its sub-jaxprs)."""
    flops: float
    bytes_read: int
    bytes_written: int
    transcendentals: float = 0.0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else math.inf

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written,
                    self.transcendentals + other.transcendentals)

    def scaled(self, w: float) -> Cost:
        return Cost(self.flops * w, int(round(self.bytes_read * w)),
                    int(round(self.bytes_written * w)), self.transcendentals * w)

    def __str__(self) -> str:
        s = f"{fmt_flops(self.flops)}, read {fmt_bytes(self.bytes_read)}, " \
            f"wrote {fmt_bytes(self.bytes_written)}"
        if self.transcendentals:
            s += f", {fmt_flops(self.transcendentals)} transcendental"
        return s


def _leaf_cost(eqn) -> Cost:
    name = ir.prim_name(eqn)
    flops = FLOP_RULES.get(name, default_flop_rule)(eqn)
    trans = TRANSCENDENTAL_RULES.get(name, default_transcendental_rule)(eqn)
    seen: set = set()
    read = 0
    for a in eqn.invars:
        if ir.is_var(a) and a not in seen:  # literals cost nothing; a value read twice
            seen.add(a)                     # by one op is loaded once
            read += _nbytes(a.aval)
    written = sum(_nbytes(v.aval) for v in eqn.outvars)
    return Cost(float(flops), int(read), int(written), float(trans))


def eqn_cost(eqn) -> Cost:
    """FLOPs, bytes read and written, and transcendentals of one equation.

    A first-order equation is priced by :data:`FLOP_RULES` (default
    :func:`default_flop_rule`); bytes are the distinct input values' sizes (literals
    count 0) plus the outputs' sizes. A higher-order equation (jit, cond, scan, while,
    custom_jvp/vjp, remat, closed_call, shard_map, ...) costs what its sub-jaxprs cost,
    weighted as in :func:`program_cost`, and nothing of its own.
    """
    if not is_higher_order(eqn):
        return _leaf_cost(eqn)
    acc = _Acc()
    for e, w, _ in _leaves_of_eqn(eqn, 1.0, (), acc):
        acc.add(e, w)
    return Cost(acc.flops, int(round(acc.bytes_read)), int(round(acc.bytes_written)),
                acc.transcendentals)


# -------------------------------------------------------------------- program cost

@dataclasses.dataclass
class ProgramCost:
    """FLOPs and bytes of a whole program, nested sub-jaxprs weighted by trip count.

    ``n_eqns`` counts the first-order equations priced (each once, not weighted; only
    the costliest branch of a cond). ``unknown_trip_counts`` is the number of while
    loops whose body was counted once because the trip count is not static;
    ``unknown_primitives`` the primitives priced by the default rule (count of eqns).
    """
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes: int = 0
    n_eqns: int = 0
    by_primitive: dict[str, float] = dataclasses.field(default_factory=dict)
    unknown_trip_counts: int = 0
    unknown_primitives: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (without fusion: a lower bound on what XLA achieves)."""
        return self.flops / self.bytes if self.bytes else math.inf

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` primitives with the most FLOPs."""
        return sorted(self.by_primitive.items(), key=lambda kv: -kv[1])[:k]

    def __str__(self) -> str:
        s = (f"{fmt_flops(self.flops)}, {fmt_bytes(self.bytes)} moved, "
             f"{self.n_eqns} eqns")
        if self.transcendentals:
            s += f", {fmt_flops(self.transcendentals)} transcendental"
        top = [f"{p} {fmt_flops(f)}" for p, f in self.top(3) if f]
        if top:
            s += " [" + ", ".join(top) + "]"
        if self.unknown_trip_counts:
            s += f"; {self.unknown_trip_counts} while loop(s) counted once"
        if self.unknown_primitives:
            s += "; default-priced: " + ", ".join(sorted(self.unknown_primitives))
        return s


class _Acc:
    """Accumulator behind :class:`ProgramCost`."""

    def __init__(self):
        self.flops = 0.0
        self.trans = 0.0
        self.bytes_read = 0.0
        self.bytes_written = 0.0
        self.n = 0
        self.by_prim: dict[str, float] = {}
        self.while_scopes: list[tuple[str, ...]] = []  # scope of each while counted once
        self.unknown_prims: dict[str, int] = {}

    @property
    def transcendentals(self) -> float:
        return self.trans

    @property
    def unknown_trips(self) -> int:
        return len(self.while_scopes)

    def add(self, eqn, w: float, cost: Cost | None = None) -> None:
        c = _leaf_cost(eqn) if cost is None else cost
        name = ir.prim_name(eqn)
        self.flops += c.flops * w
        self.trans += c.transcendentals * w
        self.bytes_read += c.bytes_read * w
        self.bytes_written += c.bytes_written * w
        self.n += 1
        self.by_prim[name] = self.by_prim.get(name, 0.0) + c.flops * w
        if name not in FLOP_RULES:
            self.unknown_prims[name] = self.unknown_prims.get(name, 0) + 1

    def result(self) -> ProgramCost:
        r, wr = int(round(self.bytes_read)), int(round(self.bytes_written))
        return ProgramCost(self.flops, self.trans, r + wr, self.n, dict(self.by_prim),
                           self.unknown_trips, dict(self.unknown_prims), r, wr)


_TRANSFORM_RE = re.compile(r"^[^()/]+\((.*)\)$")
# Scopes JAX pushes itself (AD's recomputation of a checkpointed region), not the user's.
_INTERNAL_SCOPES = frozenset({"rematted_computation"})


def _scope_components(eqn) -> tuple[str, ...]:
    """named_scope names of ``eqn`` with AD/vmap wrappers ('transpose(jvp(b1))') removed."""
    out: list[str] = []
    for comp in ir.name_stack(eqn).split("/"):
        m = _TRANSFORM_RE.match(comp)
        while m:
            comp = m.group(1)
            m = _TRANSFORM_RE.match(comp)
        # AD re-pushes a remat'd region's scope ('transpose(jvp(b))/jvp(b)'): keep one
        if comp and comp not in _INTERNAL_SCOPES and (not out or out[-1] != comp):
            out.append(comp)
    return tuple(out)


def _leaves(jaxpr, weight: float, scope: tuple[str, ...], acc: _Acc):
    """First-order equations of ``jaxpr`` (nested included) with weight and scope path."""
    for e in _jaxpr_of(jaxpr).eqns:
        sc = scope + _scope_components(e)
        if is_higher_order(e):
            yield from _leaves_of_eqn(e, weight, sc, acc)
        else:
            yield e, weight, sc


def _leaves_of_eqn(eqn, weight: float, scope: tuple[str, ...], acc: _Acc):
    name = ir.prim_name(eqn)
    w = weight * ir.trip_count(eqn)
    subs = [sub for _, _, sub in ir.subjaxpr_params(eqn)]
    if name == "cond":
        # only one branch runs: take the costliest (by FLOPs, then bytes)
        best, best_key = [], None
        for sub in subs:
            sub_acc = _Acc()
            leaves = list(_leaves(sub, w, scope, sub_acc))
            fl = sum(_leaf_cost(e).flops * lw for e, lw, _ in leaves)
            by = sum(_leaf_cost(e).bytes * lw for e, lw, _ in leaves)
            key = (fl, by)
            if best_key is None or key > best_key:
                best, best_key, best_whiles = leaves, key, sub_acc.while_scopes
        if best_key is not None:
            acc.while_scopes.extend(best_whiles)
        yield from best
        return
    if name == "while":
        # trip count not static: body and predicate counted once, and reported
        acc.while_scopes.append(scope)
    # shard_map/pmap bodies see per-device shapes: this is the per-device cost
    for sub in subs:
        yield from _leaves(sub, w, scope, acc)


def _as_jaxpr_input(closed_jaxpr):
    if isinstance(closed_jaxpr, (ir.ClosedJaxpr, ir.Jaxpr)):
        return closed_jaxpr
    raise TypeError(f"expected a ClosedJaxpr or Jaxpr, got {type(closed_jaxpr).__name__}"
                    " (trace a function with jax.make_jaxpr first)")


# Call primitives that only wrap a body: a program that is one such call is looked
# through by the schedule analyses (``jax.make_jaxpr(jax.jit(f))`` gives exactly that).
_CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})


def top_level(closed_jaxpr):
    """The jaxpr whose equations :func:`liveness` and :func:`critical_path` index.

    The program's own jaxpr, except that a program consisting of a single jit /
    closed_call equation is looked through (repeatedly) to its body.
    """
    jaxpr = _jaxpr_of(_as_jaxpr_input(closed_jaxpr))
    while len(jaxpr.eqns) == 1 and ir.prim_name(jaxpr.eqns[0]) in _CALL_PRIMITIVES:
        subs = [sub for _, _, sub in ir.subjaxpr_params(jaxpr.eqns[0])]
        if len(subs) != 1:
            break
        jaxpr = _jaxpr_of(subs[0])
    return jaxpr


def program_cost(closed_jaxpr) -> ProgramCost:
    """FLOPs, transcendentals and bytes of a whole program, nested sub-jaxprs included.

    Sub-jaxprs are weighted by how often they run: a scan body ``length`` times, a
    while loop once (counted in ``unknown_trip_counts``), a cond by its costliest
    branch. A higher-order equation contributes only its sub-jaxprs' cost. Bytes are
    unfused (every equation reads its inputs and writes its outputs), so they are an
    upper bound on the memory traffic of the compiled program.
    """
    acc = _Acc()
    for e, w, _ in _leaves(_as_jaxpr_input(closed_jaxpr), 1.0, (), acc):
        acc.add(e, w)
    return acc.result()


def cost_by_scope(closed_jaxpr, depth: int = 1) -> dict[str, ProgramCost]:
    """:func:`program_cost` split by the first ``depth`` ``jax.named_scope`` names.

    Scope paths of nested equations continue their caller's path; AD and vmap wrappers
    are dropped, so a block's forward and backward land in the same group
    ('transpose(jvp(block3))' → 'block3'). Unscoped equations go under ''. The groups
    sum to :func:`program_cost`; a while loop counted once is reported in the group of
    the while equation itself.
    """
    accs: dict[str, _Acc] = {}
    top = _Acc()
    for e, w, sc in _leaves(_as_jaxpr_input(closed_jaxpr), 1.0, (), top):
        accs.setdefault("/".join(sc[:depth]), _Acc()).add(e, w)
    for sc in top.while_scopes:
        accs.setdefault("/".join(sc[:depth]), _Acc()).while_scopes.append(sc)
    return {k: a.result() for k, a in accs.items()}


# ----------------------------------------------------------------------- liveness

ARG, TEMP, OUT = "arg", "temp", "out"


@dataclasses.dataclass
class Liveness:
    """Live values along a jaxpr's own equation order (an estimate of XLA's memory).

    Every value is live from its producing equation to its last use; program inputs
    and constants (``kind == 'arg'``) from the start, program outputs (``'out'``) to the
    end; everything else is a temporary (``'temp'``). ``intervals[v] = (start, last)``
    with ``start == -1`` for arguments and ``last == n_eqns`` for outputs.

    Arrays, one entry per equation ``i``:

    - ``temp_after[i]``: bytes of temporaries still live after equation ``i`` ran;
    - ``temp_during[i]``: bytes held while ``i`` runs — temporaries it reads or that
      pass it by, its temporary outputs (dropped ones too), plus ``inner_temp[i]``;
    - ``inner_temp[i]``: for an equation with sub-jaxprs, their own peak temporaries
      (recursively; a scan body's peak once, a cond's largest branch);
    - ``out_after[i]`` / ``out_during[i]``: program outputs produced so far.

    ``arg_bytes`` is the constant size of inputs and constants. Like XLA's
    ``temp_size_in_bytes``, ``temp_*`` excludes arguments and outputs. It ignores
    fusion (XLA never materializes most elementwise intermediates), buffer reuse
    limits and XLA's reordering, so expect it to overestimate XLA's figure on chains of
    elementwise ops and to differ either way after rescheduling.
    """
    n_eqns: int
    intervals: dict
    kind: dict
    nbytes: dict
    temp_after: np.ndarray
    temp_during: np.ndarray
    inner_temp: np.ndarray
    out_after: np.ndarray
    out_during: np.ndarray
    arg_bytes: int

    def live_after(self, i: int, kinds: Iterable[str] = (ARG, TEMP, OUT)) -> set:
        """Values of the given kinds live after equation ``i`` (``i=-1``: at entry)."""
        kinds = set(kinds)
        return {v for v, (s, l) in self.intervals.items()
                if self.kind[v] in kinds and s <= i < l}

    def total_after(self) -> np.ndarray:
        return self.temp_after + self.out_after + self.arg_bytes

    def total_during(self) -> np.ndarray:
        return self.temp_during + self.out_during + self.arg_bytes

    def peak(self, include_args: bool = False) -> tuple[int, int]:
        """(peak bytes, equation index) of ``temp_during`` (plus args/outputs if asked)."""
        arr = self.total_during() if include_args else self.temp_during
        if len(arr) == 0:
            return (self.arg_bytes if include_args else 0), -1
        i = int(np.argmax(arr))
        return int(arr[i]), i

    def __str__(self) -> str:
        peak, i = self.peak()
        return (f"Liveness over {self.n_eqns} eqns: peak temp {fmt_bytes(peak)} at eqn "
                f"{i}, args {fmt_bytes(self.arg_bytes)}, outputs "
                f"{fmt_bytes(int(self.out_after[-1]) if self.n_eqns else 0)} "
                "(estimate of XLA's temp_size_in_bytes)")


def _inner_peak_temp(eqn) -> int:
    """Peak temporaries an equation's sub-jaxprs need while it runs (0 if none)."""
    if not is_higher_order(eqn):
        return 0
    # sub-jaxprs of one equation never run at the same time (cond branches, while's
    # predicate and body), so the largest one counts; a scan body's peak once
    return max((peak_memory(sub)[0] for _, _, sub in ir.subjaxpr_params(eqn)), default=0)


def liveness(closed_jaxpr) -> Liveness:
    """Live-value analysis of the top-level jaxpr in its equation order.

    See :class:`Liveness`. Sub-jaxprs are not unrolled: an equation that has them adds,
    while it runs, their own peak temporaries (recursively). A program that is a single
    jit call is analysed inside that call (see :func:`top_level`).
    """
    jaxpr = top_level(closed_jaxpr)
    eqns = jaxpr.eqns
    n = len(eqns)
    intervals: dict = {}
    kind: dict = {}
    nbytes: dict = {}
    for v in list(jaxpr.constvars) + list(jaxpr.invars):
        if ir.is_var(v):
            intervals[v] = (-1, -1)
            kind[v] = ARG
            nbytes[v] = _nbytes(v.aval)
    drop_bytes = np.zeros(n, dtype=np.int64)  # outputs nobody holds (DropVar)
    for i, e in enumerate(eqns):
        for a in e.invars:
            if ir.is_var(a) and a in intervals:
                s, _ = intervals[a]
                intervals[a] = (s, i)
        for v in e.outvars:
            if ir.is_var(v):
                intervals[v] = (i, i)
                kind[v] = TEMP
                nbytes[v] = _nbytes(v.aval)
            else:
                drop_bytes[i] += _nbytes(v.aval)
    for v in jaxpr.outvars:
        if ir.is_var(v) and v in intervals:
            intervals[v] = (intervals[v][0], n)
            if kind[v] == TEMP:
                kind[v] = OUT
    # arguments stay allocated the whole program (XLA frees no parameter it does not own)
    for v, k in kind.items():
        if k == ARG:
            intervals[v] = (-1, n)

    inner = np.array([_inner_peak_temp(e) for e in eqns], dtype=np.int64)
    # difference arrays: value live after i for s <= i < l; held during i for s < i <= l
    d_after = {TEMP: np.zeros(n + 1, np.int64), OUT: np.zeros(n + 1, np.int64)}
    d_during = {TEMP: np.zeros(n + 2, np.int64), OUT: np.zeros(n + 2, np.int64)}
    arg_bytes = 0
    for v, (s, l) in intervals.items():
        k, b = kind[v], nbytes[v]
        if k == ARG:
            arg_bytes += b
            continue
        if l > s:
            d_after[k][s] += b
            d_after[k][min(l, n)] -= b
        # held while it is produced (s) and until its last reader has run (l)
        d_during[k][s] += b
        d_during[k][min(l, n - 1) + 1] -= b
    temp_after = np.cumsum(d_after[TEMP])[:n]
    out_after = np.cumsum(d_after[OUT])[:n]
    temp_during = np.cumsum(d_during[TEMP])[:n] + drop_bytes + inner
    out_during = np.cumsum(d_during[OUT])[:n]
    return Liveness(n, intervals, kind, nbytes, temp_after, temp_during, inner,
                    out_after, out_during, int(arg_bytes))


def peak_memory(closed_jaxpr, include_args: bool = False) -> tuple[int, int]:
    """Estimated peak bytes along the equation order, and the equation where it occurs.

    Temporaries only by default (like XLA's ``temp_size_in_bytes``, which excludes
    argument and output buffers); ``include_args=True`` adds inputs, constants and the
    outputs produced so far. An estimate: no fusion, no reordering (see
    :class:`Liveness`). The index is into ``top_level(closed_jaxpr).eqns``; ``-1`` for
    a program without equations.
    """
    return liveness(closed_jaxpr).peak(include_args)


def memory_timeline(closed_jaxpr, include_args: bool = False,
                    at: str = "after") -> np.ndarray:
    """Estimated live bytes per top-level equation (for plots).

    ``at="after"``: what stays live once equation ``i`` has run; ``at="during"``: what
    is held while it runs (its inputs, outputs and sub-jaxprs' temporaries; its maximum
    is :func:`peak_memory`). Temporaries only unless ``include_args``.
    """
    lv = liveness(closed_jaxpr)
    if at == "after":
        return lv.total_after() if include_args else lv.temp_after.copy()
    if at == "during":
        return lv.total_during() if include_args else lv.temp_during.copy()
    raise ValueError(f"at must be 'after' or 'during', got {at!r}")


# --------------------------------------------------------------------- XLA figures

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_aware_scheduler_flag() -> str:
    """The ``XLA_FLAGS`` entry that makes XLA:CPU schedule for memory.

    XLA's default CPU scheduler optimizes for concurrency and ignores memory, so
    rematerialization savings only show in :func:`xla_memory` with this flag. It must be
    in the ``XLA_FLAGS`` environment variable before JAX initializes its backend (before
    the first computation), e.g. ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_
    scheduler=false python ...``; setting it later in a running process has no effect.
    Reports should say whether it was set (:func:`memory_aware_scheduler_active`).
    """
    return _SCHEDULER_FLAG


def memory_aware_scheduler_active() -> bool:
    """Whether ``XLA_FLAGS`` in this process's environment carries the flag above."""
    return _SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "").split()


def _compile(fn, args, kwargs):
    if isinstance(fn, ir.ClosedJaxpr):
        fn = ir.jaxpr_as_fun(fn)
    lower = getattr(fn, "lower", None)  # already jitted: keep its static args etc.
    if lower is None:
        lower = jax.jit(fn).lower
    return lower(*args, **kwargs).compile()


def _memory_dict(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(
            f"XLA reports no memory_analysis() on backend {jax.default_backend()!r}; "
            "use peak_memory() for an estimate instead")
    peak = getattr(ma, "peak_memory_in_bytes", None)
    return {
        "temp_bytes": int(ma.temp_size_in_bytes),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "peak_bytes": None if peak is None else int(peak),
    }


def xla_memory(fn, *args, **kwargs) -> dict:
    """XLA's own memory figures for ``jax.jit(fn)`` compiled on ``args``.

    Keys: ``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``alias_bytes``,
    ``generated_code_bytes`` (ints) and ``peak_bytes`` (int, or None where this jaxlib
    does not report it). ``fn`` may be a plain function, an already-jitted one (its
    static arguments are honoured) or a ClosedJaxpr (``args`` then are its flat inputs).
    On CPU the figure depends on the scheduler: see :func:`memory_aware_scheduler_flag`.
    Raises RuntimeError where the backend reports no memory analysis.
    """
    return _memory_dict(_compile(fn, args, kwargs))


def _cost_dict(compiled) -> dict:
    raw = compiled.cost_analysis()
    if raw is None:
        raise RuntimeError(
            f"XLA reports no cost_analysis() on backend {jax.default_backend()!r}; "
            "use program_cost() for an estimate instead")
    # older jaxlibs return one dict per device/partition in a list
    parts = [raw] if isinstance(raw, dict) else [p for p in raw if p]
    merged: dict[str, float] = {}
    for p in parts[:1]:
        merged.update({k: float(v) for k, v in p.items()
                       if isinstance(v, (int, float, np.number))})
    return {
        "flops": merged.get("flops", 0.0),
        "transcendentals": merged.get("transcendentals", 0.0),
        "bytes_accessed": merged.get("bytes accessed", 0.0),
        "raw": merged,
    }


def xla_cost(fn, *args, **kwargs) -> dict:
    """XLA's ``cost_analysis()`` of ``jax.jit(fn)`` on ``args``, normalized to one dict.

    Keys ``flops``, ``transcendentals``, ``bytes_accessed`` (floats; XLA counts after
    fusion, and a while body once) and ``raw`` (every numeric entry XLA gave). Raises
    RuntimeError where the backend reports none.
    """
    return _cost_dict(_compile(fn, args, kwargs))


def estimate_vs_xla(fn, *args, **kwargs) -> dict:
    """Compare :func:`peak_memory` of ``jax.make_jaxpr(fn)(*args)`` with XLA's temp bytes.

    Returns ``estimate`` and ``xla`` (bytes), ``rel_error`` ((estimate - xla) / xla;
    0 when both are 0, inf when only XLA's is 0), ``eqn_at_peak`` and ``scheduler``
    ('memory-aware' or 'default', see :func:`memory_aware_scheduler_flag`).
    """
    cj = jax.make_jaxpr(fn)(*args, **kwargs)
    est, at = peak_memory(cj)
    xla = xla_memory(fn, *args, **kwargs)["temp_bytes"]
    if xla:
        rel = (est - xla) / xla
    else:
        rel = 0.0 if est == 0 else math.inf
    return {"estimate": int(est), "xla": int(xla), "rel_error": float(rel),
            "eqn_at_peak": at,
            "scheduler": "memory-aware" if memory_aware_scheduler_active() else "default"}


# ----------------------------------------------------------- critical path / parallel

# Added to every node's FLOPs when choosing the longest path, so a chain of zero-FLOP
# ops (reshapes, casts) still has a length; not included in the FLOPs reported.
NODE_EPS = 1e-3


def _dag_preds(jaxpr) -> list[set[int]]:
    g = ir.Graph(jaxpr)
    preds: list[set[int]] = [set() for _ in g.eqns]
    last_effect = None
    for i, e in enumerate(g.eqns):
        for a in e.invars:
            if ir.is_var(a) and a in g.producer:
                preds[i].add(g.producer[a])
        # effectful equations keep their order: chain them
        if ir.effectful(e):
            if last_effect is not None:
                preds[i].add(last_effect)
            last_effect = i
    return preds


def critical_path(closed_jaxpr) -> tuple[float, list[int]]:
    """Longest FLOP-weighted chain through the top-level dataflow graph.

    Nodes are top-level equations weighted by :func:`eqn_cost` FLOPs (a higher-order
    equation by its sub-jaxprs' FLOPs) plus :data:`NODE_EPS`; edges are data
    dependencies (and the order of effectful equations). Returns (FLOPs on the path,
    indices into ``top_level(closed_jaxpr).eqns`` along it, in order); ``(0.0, [])`` for
    no equations. A program that is one jit call is looked through (:func:`top_level`).
    """
    jaxpr = top_level(closed_jaxpr)
    eqns = jaxpr.eqns
    if not eqns:
        return 0.0, []
    flops = [eqn_cost(e).flops for e in eqns]
    preds = _dag_preds(jaxpr)
    dist = np.zeros(len(eqns))
    back = [-1] * len(eqns)
    for i in range(len(eqns)):  # jaxpr order is topological
        best, arg = 0.0, -1
        for p in sorted(preds[i]):  # ties go to the earliest predecessor
            if dist[p] > best:
                best, arg = dist[p], p
        dist[i] = best + flops[i] + NODE_EPS
        back[i] = arg
    i = int(np.argmax(dist))
    path = []
    while i != -1:
        path.append(i)
        i = back[i]
    path.reverse()
    return float(sum(flops[j] for j in path)), path


def parallelism(closed_jaxpr) -> float:
    """Total top-level FLOPs / critical-path FLOPs: how many chains could run at once.

    1.0 for a pure chain, about k for k equal independent branches. Where the program
    has no FLOPs, the ratio of equation counts is used instead.
    """
    jaxpr = top_level(closed_jaxpr)
    if not jaxpr.eqns:
        return 1.0
    path_flops, path = critical_path(jaxpr)
    total = sum(eqn_cost(e).flops for e in jaxpr.eqns)
    if path_flops > 0:
        return float(total / path_flops)
    return len(jaxpr.eqns) / max(len(path), 1)


def independent_branches(closed_jaxpr) -> list[list[int]]:
    """Groups of top-level equations that share no intermediate value.

    Connected components of the dataflow graph (program inputs do not connect: two
    matmuls reading the same ``x`` are independent), largest FLOPs first; each group's
    indices into ``top_level(closed_jaxpr).eqns`` in order. More than one group means
    work XLA could overlap.
    """
    jaxpr = top_level(closed_jaxpr)
    n = len(jaxpr.eqns)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, ps in enumerate(_dag_preds(jaxpr)):
        for p in ps:
            parent[find(i)] = find(p)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    flops = [eqn_cost(e).flops for e in jaxpr.eqns]
    return sorted(groups.values(), key=lambda g: (-sum(flops[i] for i in g), g[0]))


__all__ = [
    "Cost", "ProgramCost", "Liveness", "FLOP_RULES", "TRANSCENDENTAL_RULES",
    "COMBINER_PRIMITIVES", "NODE_EPS", "default_flop_rule", "default_transcendental_rule",
    "is_higher_order", "top_level", "eqn_cost", "program_cost", "cost_by_scope", "liveness",
    "peak_memory", "memory_timeline", "xla_memory", "xla_cost", "estimate_vs_xla",
    "memory_aware_scheduler_flag", "memory_aware_scheduler_active", "critical_path",
    "parallelism", "independent_branches", "fmt_bytes", "fmt_flops",
]
