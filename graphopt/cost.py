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

from . import ir, primitives
from .cost_rules import (COMBINER_PRIMITIVES, FLOP_RULES, TRANSCENDENTAL_RULES,  # noqa: F401
                         _jaxpr_of, default_flop_rule, default_transcendental_rule,
                         is_higher_order)

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


def top_level(closed_jaxpr):
    """The jaxpr whose equations :func:`liveness` and :func:`critical_path` index.

    The program's own jaxpr, except that a program consisting of a single jit /
    closed_call equation is looked through (repeatedly) to its body.
    """
    jaxpr = _jaxpr_of(_as_jaxpr_input(closed_jaxpr))
    while len(jaxpr.eqns) == 1 and ir.prim_name(jaxpr.eqns[0]) in primitives.CALLS:
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
