"""Rematerialization planning: segments of the forward pass and what dropping them saves.

Reads a jaxpr, changes nothing. The forward part of a schedule (everything before the
first backward equation, or a whole pre-AD function) is cut at *candidate cuts*:
positions where few bytes cross from earlier to later forward equations (block
boundaries of a residual network, for instance). Between two consecutive cuts lies a
:class:`Segment`; rematerializing a segment means keeping only its *live-ins* (the
values from earlier it needs) and recomputing its *residuals* (its values the backward
reads) right before the backward first needs them.

The memory model (:meth:`Plan.model_bytes`): bytes of the values that persist from
forward to backward (residuals of kept segments, live-ins of rematerialized ones,
residuals that cannot be recomputed), plus the largest rematerialized segment's
residuals (live again while its backward runs). It is an estimate; the ``remat`` pass
calibrates it against XLA's own figure. :func:`recomputed_segments` gives what a choice
actually recomputes: the chosen segments without the outputs that persist anyway.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from graphopt import analysis, ir, primitives

# Primitives never recomputed even though they are pure: recomputing them costs more
# than it can save, or they carry state of their own.
NO_RECOMPUTE = frozenset({"while", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def recomputable(eqn) -> bool:
    """Pure, known, and deterministic: running it twice gives the same value."""
    if ir.impure(eqn) or eqn.primitive.name in NO_RECOMPUTE:
        return False
    if eqn.primitive.name not in ir.known_primitives():
        return False
    return all(recomputable(e) for _, _, sub in ir.subjaxpr_params(eqn)
               for e in ir.as_closed(sub).jaxpr.eqns)


# Comparisons whose result flips on a last-bit difference of an operand.
COMPARISONS = primitives.COMPARISONS


def float_compare(eqn) -> bool:
    """A comparison of two computed floating values (a max's gradient mask
    ``eq(x, max x)``): recomputing one side only can empty the mask, since XLA does not
    round the same dot bit-identically in two contexts."""
    return (eqn.primitive.name in COMPARISONS and len(eqn.invars) == 2
            and all(ir.is_var(a) and jnp.issubdtype(a.aval.dtype, jnp.inexact)
                    for a in eqn.invars))


def split_compares(eqns, picked, computed) -> set:
    """Indices in ``picked`` of float comparisons reading one value the picked equations
    make and one they do not that is made elsewhere (in ``computed``): a recomputation
    must keep their result rather than recompute it."""
    made = {v for i in picked for v in eqns[i].outvars if ir.is_var(v)}
    return {i for i in picked if float_compare(eqns[i])
            and any(a in made for a in eqns[i].invars)
            and any(a not in made and a in computed for a in eqns[i].invars)}


def backward_start(jaxpr) -> int | None:
    """Index of the first equation of the backward pass (name stack 'transpose('), or None."""
    for i, e in enumerate(jaxpr.eqns):
        if "transpose(" in ir.name_stack(e):
            return i
    return None


@dataclasses.dataclass
class Segment:
    start: int                    # equation range [start, stop) of the forward
    stop: int
    outputs: list                 # residuals it recomputes (vars read by the backward)
    eqns: list                    # indices of the equations the recomputation runs
    inputs: list                  # every var those equations read from outside (args too)
    liveins: list                 # the inputs that are forward temporaries (kept if remat)
    flops: float                  # FLOPs of one recomputation
    out_bytes: int
    pieces: tuple = (0, 0)        # the run of pieces [i, j) between cuts it covers
    keeps_dots: bool = False      # dot/conv outputs persist; only the rest is recomputed

    @property
    def name(self) -> str:
        return f"[{self.start}:{self.stop})"


@dataclasses.dataclass
class Plan:
    """Segments of one forward pass, the byte sizes of the values they involve."""
    n_forward: int
    bwd_start: int                # first equation after the forward (len(eqns) pre-AD)
    cuts: list
    segments: list
    pinned: list                  # residuals that cannot be recomputed (impure producers)
    nbytes: dict                  # var -> bytes
    residual_bytes: int           # all residuals, nothing rematerialized
    n_pieces: int = 0

    def model_bytes(self, remat) -> int:
        """Estimated persistent + transient bytes when segments ``remat`` (bools) recompute."""
        keep = set(self.pinned)
        for s in self.segments:
            keep.update(s.outputs)
        live = set()
        transient = 0
        for s, r in zip(self.segments, remat):
            if r:
                keep.difference_update(s.outputs)
                live.update(s.liveins)
                transient = max(transient, s.out_bytes)
        return sum(self.nbytes[v] for v in keep | live) + transient

    def flops(self, remat) -> float:
        return float(sum(s.flops for s, r in zip(self.segments, remat) if r))

    def overlapping(self, remat) -> bool:
        used = set()
        for s, r in zip(self.segments, remat):
            if r:
                span = set(range(*s.pieces))
                if used & span:
                    return True
                used |= span
        return False


def _cross_bytes(eqns, n_fwd: int) -> np.ndarray:
    """cross[p] = bytes of forward temporaries made before p and read at p..n_fwd-1."""
    first: dict = {}
    last: dict = {}
    for i in range(n_fwd):
        e = eqns[i]
        for a in e.invars:
            if ir.is_var(a) and a in first:
                last[a] = i
        for v in e.outvars:
            if ir.is_var(v):
                first[v] = i
    d = np.zeros(n_fwd + 2, np.int64)
    for v, i in first.items():
        l = last.get(v)
        if l is not None and l > i:
            b = ir.aval_nbytes(v.aval)
            d[i + 1] += b
            d[l + 1] -= b
    return np.cumsum(d)[: n_fwd + 1]


def candidate_cuts(eqns, n_fwd: int, max_cuts: int = 128) -> list[int]:
    """Positions 0 < p < n_fwd where the crossing bytes are a local minimum.

    A plateau contributes both its ends. At most ``max_cuts``, the cheapest.
    """
    if n_fwd < 2:
        return []
    cross = _cross_bytes(eqns, n_fwd)
    cands = []
    p = 1
    while p < n_fwd:  # plateaus of equal bytes: both ends are candidates
        q = p
        while q + 1 < n_fwd and cross[q + 1] == cross[p]:
            q += 1
        left = cross[p - 1] if p > 1 else np.iinfo(np.int64).max
        right = cross[q + 1] if q + 1 < n_fwd else np.iinfo(np.int64).max
        if cross[p] < left and cross[p] < right or cross[p] == 0:
            cands.extend([p] if q == p else [p, q])
        p = q + 1
    if len(cands) > max_cuts:
        cands = sorted(sorted(cands, key=lambda p: (cross[p], p))[:max_cuts])
    return cands


def _slice(eqns, idx, outs):
    """The equations of ``idx`` (ascending) that make ``outs``, and what they read from outside."""
    made_by = {v for i in idx for v in eqns[i].outvars if ir.is_var(v)}
    need = set(outs)
    picked = []
    for i in reversed(idx):
        e = eqns[i]
        if any(ir.is_var(v) and v in need for v in e.outvars):
            picked.append(i)
            need.update(x for x in e.invars if ir.is_var(x) and x in made_by)
    picked.reverse()
    made = {v for i in picked for v in eqns[i].outvars if ir.is_var(v)}
    inputs = list(dict.fromkeys(x for i in picked for x in eqns[i].invars
                                if ir.is_var(x) and x not in made))
    return picked, inputs


def _segment(eqns, a, b, residuals, producer, can, flops, nbytes, exact=False):
    """The recomputation of forward equations [a, b): what it outputs, runs and reads.
    ``exact``: a comparison of a recomputed with a kept value is kept, not recomputed."""
    idx = [i for i in range(a, b) if can[i]]
    while True:
        outs_s = [v for i in idx for v in eqns[i].outvars if ir.is_var(v) and v in residuals]
        if not outs_s:
            return None
        picked, inputs = _slice(eqns, idx, outs_s)
        bad = split_compares(eqns, picked, producer) if exact else ()
        if not bad:
            break
        idx = [i for i in idx if i not in bad]
    liveins = [x for x in inputs if x in producer]
    return Segment(a, b, outs_s, picked, inputs, liveins, float(sum(flops[i] for i in picked)),
                   int(sum(nbytes[v] for v in outs_s)))


def recomputed_segments(jaxpr, plan: Plan, remat) -> list:
    """The chosen segments, each without the outputs that stay live anyway.

    A chosen segment's output that is a live-in of another chosen segment (a residual
    network's block output, the next block's input) persists from the forward. When the
    backward is done with it before the segment's other outputs are first needed,
    recomputing it wastes FLOPs and, worse, pulls the recomputation forward to that
    value's first backward use, into the next block's backward (deep MLP: 13.0 -> 8.5
    MiB). One still read after that point is recomputed: keeping the forward copy would
    stretch its life (GPT's attention inputs). Segments left with nothing are dropped.
    """
    eqns = jaxpr.eqns
    first, last = {}, {}
    for i in range(plan.bwd_start, len(eqns)):
        for a in eqns[i].invars:
            if ir.is_var(a):
                first.setdefault(a, i)
                last[a] = i
    kept = set(plan.pinned)
    for s, r in zip(plan.segments, remat):
        if r:
            kept.update(s.liveins)
    out = []
    for s, r in zip(plan.segments, remat):
        if not r:
            continue
        at = min((first[v] for v in s.outputs if v not in kept and v in first),
                 default=len(eqns))
        outs = [v for v in s.outputs if v not in kept or last.get(v, -1) >= at]
        if len(outs) < len(s.outputs) and outs:
            picked, inputs = _slice(eqns, s.eqns, outs)
            s = dataclasses.replace(
                s, outputs=outs, eqns=picked, inputs=inputs,
                liveins=[x for x in inputs if x in plan.nbytes],
                flops=float(sum(analysis.eqn_cost(eqns[i]).flops for i in picked)),
                out_bytes=int(sum(plan.nbytes[v] for v in outs)))
        if outs:
            out.append(s)
    return out


# Primitives a dots-kept segment never recomputes (like jax.checkpoint's dots_saveable).
DOTS = primitives.DOTS


def build_plan(cj, bwd_start: int | None = None, residuals=None, max_cuts: int = 128,
               max_span: int = 8, dots_kept_span: int = 8) -> Plan:
    """Segments of the forward ``eqns[:bwd_start]`` of ``cj``'s top-level jaxpr.

    ``residuals``: the vars the backward reads; by default every forward var read at or
    after ``bwd_start`` (post-AD). Program outputs are never residuals (they live to the
    end anyway). Segments are runs of 1..``max_span`` consecutive pieces between cuts;
    a solver picks non-overlapping ones. Runs of up to ``dots_kept_span`` pieces also get
    a *dots-kept* variant: their dot/conv outputs persist and only the cheap rest is
    recomputed (bytes for almost no FLOPs, what ``dots_saveable`` does by hand).
    """
    jaxpr = cj.jaxpr if isinstance(cj, ir.ClosedJaxpr) else cj
    eqns = jaxpr.eqns
    n_fwd = len(eqns) if bwd_start is None else bwd_start
    producer = {}
    for i in range(n_fwd):
        for v in eqns[i].outvars:
            if ir.is_var(v):
                producer[v] = i
    outs = {v for v in jaxpr.outvars if ir.is_var(v)}
    if residuals is None:
        residuals = set()
        for e in eqns[n_fwd:]:
            for a in e.invars:
                if ir.is_var(a) and a in producer:
                    residuals.add(a)
    residuals = {v for v in residuals if v in producer and v not in outs}
    nbytes = {v: ir.aval_nbytes(v.aval) for v in producer}
    can = [recomputable(eqns[i]) for i in range(n_fwd)]
    exact = bwd_start is not None  # post-AD: a fenced copy may round unlike the original
    # a backward comparison's forward operands stay as they are: one recomputed could differ
    compared = {a for e in eqns[n_fwd:] if exact and float_compare(e) for a in e.invars}
    pinned = sorted((v for v in residuals if not can[producer[v]] or v in compared),
                    key=lambda v: producer[v])
    res_bytes = int(sum(nbytes[v] for v in residuals))
    residuals -= compared
    cuts = candidate_cuts(eqns, n_fwd, max_cuts)
    bounds = [0] + cuts + [n_fwd]
    flops = [analysis.eqn_cost(eqns[i]).flops if can[i] else 0.0 for i in range(n_fwd)]
    segments = []
    n_pieces = len(bounds) - 1
    cheap = [c and eqns[i].primitive.name not in DOTS for i, c in enumerate(can)]
    for pi in range(n_pieces):
        for pj in range(pi + 1, min(n_pieces, pi + max_span) + 1):
            seg = _segment(eqns, bounds[pi], bounds[pj], residuals, producer, can, flops,
                           nbytes, exact)
            if seg is None:
                continue
            seg.pieces = (pi, pj)
            segments.append(seg)
            if pj - pi <= dots_kept_span:
                alt = _segment(eqns, bounds[pi], bounds[pj], residuals, producer, cheap, flops,
                               nbytes, exact)
                if alt is not None and alt.eqns != seg.eqns:
                    alt.pieces, alt.keeps_dots = (pi, pj), True
                    segments.append(alt)
    return Plan(n_fwd, n_fwd if bwd_start is None else bwd_start, cuts, segments, pinned,
                nbytes, res_bytes, n_pieces)


__all__ = ["Plan", "Segment", "DOTS", "build_plan", "candidate_cuts", "backward_start",
           "recomputable",
           "recomputed_segments", "NO_RECOMPUTE", "COMPARISONS", "float_compare",
           "split_compares"]
