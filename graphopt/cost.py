"""FLOPs and bytes per equation and per program, from per-primitive rule tables.

:func:`eqn_cost` / :func:`program_cost` / :func:`cost_by_scope` count FLOPs,
transcendentals and bytes moved, from :data:`FLOP_RULES` and
:data:`TRANSCENDENTAL_RULES` with an explicit default. Nested sub-jaxprs count, weighted
by how often they run (scan: ``length``; while: once, and reported; cond: the costliest
branch). :func:`fmt_bytes` / :func:`fmt_flops` give human units. Reads jaxprs only.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

import jax

from . import ir

# ------------------------------------------------------------------------ formatting

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_FLOP_UNITS = ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP")


def _in_units(n: float, units: tuple, base: int, smallest) -> str:
    """``n`` in the largest unit below ``base``; ``smallest(n)`` formats the first unit."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{sign}{smallest(n) if unit == units[0] else f'{n:.1f}'} {unit}"
        n /= base
    raise AssertionError("unreachable")


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: ``fmt_bytes(1536 * 1024) == '1.5 MiB'``, ``'512 B'``."""
    return _in_units(n, _BYTE_UNITS, 1024, lambda b: str(int(b)))


def fmt_flops(n: float) -> str:
    """FLOPs in decimal (SI) units: ``fmt_flops(3.2e9) == '3.2 GFLOP'``, ``'12 FLOP'``."""
    return _in_units(n, _FLOP_UNITS, 1000, lambda f: f"{f:.0f}")


# ------------------------------------------------------------------- small helpers

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
    "floor", "ceil", "round", "nextafter", "square", "one_minus_square", "eq", "ne", "lt",
    "le", "gt", "ge",
    "and", "or", "not", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "population_count", "clz", "select_n", "is_finite", "conj",
    "sqrt", "rsqrt", "cbrt", "pow", "fma", "fmuladd",
)
# Transcendental functions: one flop per output element plus a transcendental.
_TRANSCENDENTAL = (
    "exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf",
    "erfc", "erf_inv", "lgamma", "digamma", "igamma", "igammac", "igamma_grad_a",
    "random_gamma_grad", "bessel_i0e", "bessel_i1e", "polygamma", "zeta",
    # JAX 0.12's new elementwise primitives
    "log2", "log2p1", "exp2m1", "sinpi", "cospi", "tanpi", "asinpi", "acospi", "atanpi",
    "atan2pi",
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
            read += ir.aval_nbytes(a.aval)
    written = sum(ir.aval_nbytes(v.aval) for v in eqn.outvars)
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


# Scopes JAX pushes itself (AD's recomputation of a checkpointed region), not the user's.
_INTERNAL_SCOPES = frozenset({"rematted_computation"})


def _scope_components(eqn) -> tuple[str, ...]:
    """named_scope names of ``eqn`` with AD/vmap wrappers ('transpose(jvp(b1))') removed."""
    return ir.scope_path(ir.name_stack(eqn), _INTERNAL_SCOPES)


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
