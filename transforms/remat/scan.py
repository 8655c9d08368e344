"""Scan checkpointing as a jaxpr rewrite: layers under ``lax.scan``, post-AD.

In the joint forward+backward jaxpr of a scanned model, the forward ``scan`` F emits
every per-iteration residual stacked along the scan axis (ys outputs) and the backward
``scan`` B (its transpose, ``reverse=True``) reads them back as xs. This module finds
such (F, B) pairs and, for a chosen set of residuals:

- F emits its per-iteration carry inputs instead (stacked; usually far smaller), and
  no longer emits the dropped residuals;
- B receives F's consts (as consts), the stacked carries and F's xs (as xs) and, at the
  top of its body, recomputes the dropped residuals from the slices of iteration i by
  re-running the needed part of F's body (equations named ``remat/...``). Residuals B
  still receives are reused rather than recomputed.

Slices line up whatever the iteration order: a scan reads ``xs[i]`` and writes
``ys[i]`` in iteration i, forward or reverse, so B's slice i of a stacked carry is the
carry F's iteration i started from. No fence: the recomputation runs in another loop
body, which XLA's CSE cannot merge with the forward (measured, see docs/remat.md).

Which residuals to drop is a greedy order by bytes saved per recomputed FLOP
(:func:`plan_scans`); the ``remat`` pass measures prefixes of it against the budget. A
plan can keep dot outputs (a row of :data:`.policies.POLICIES`, like ``jax.checkpoint``'s
dots policies): the recomputation then starts from them, and F emits the ones it needs,
stacked. Broadcast constants reach B as their small sources
(:func:`.scan_chunks.sink_broadcasts`).

Deeper levels chunk the stacked carries (the sqrt(L) / nested scan checkpoint), on top
of the deepest prefix, one pair per level, most bytes per FLOP first; that rewrite lives
in :mod:`.scan_chunks`. A pair whose length has no divisor, or where no chunk size
saves bytes (GPT's 4 layers), stays unchunked, with a note.

Must not: drop a residual or chunk a carry that something other than B reads (it stays
alive anyway), recompute random, effectful or unknown primitives (see
:func:`.plan.recomputable`), or touch scans whose xs are literals.
"""
from __future__ import annotations

import dataclasses

from graphopt import analysis, ir

from .plan import recomputable, split_compares
from .policies import KEEP, KEEP_ORDER, policy
from .scan_chunks import Chunking, apply_chunks, plan_chunks, sink_broadcasts


@dataclasses.dataclass
class Residual:
    y: int              # index among F's ys outputs
    body_var: object    # the var F's body emits for it
    outer: object       # F's stacked output var
    bpos: list          # positions in B's invars (xs) that read it
    nbytes: int


@dataclasses.dataclass
class ScanPair:
    f: int              # indices of F and B in the top-level equations
    b: int
    residuals: list
    length: int
    passthrough: dict = dataclasses.field(default_factory=dict)  # body var -> B position


    def f_eqn(self, jaxpr):
        return jaxpr.eqns[self.f]

    def b_eqn(self, jaxpr):
        return jaxpr.eqns[self.b]


@dataclasses.dataclass
class ScanPlan:
    pairs: list
    order: list         # (pair index, residual index), most bytes per FLOP first
    levels: list        # (k, model bytes saved, FLOPs recomputed) for useful prefixes k;
    #                     k > len(order): the base_k prefix, plus the first
    #                     k - len(order) chunkings
    chunks: list = dataclasses.field(default_factory=list)  # Chunking, best first
    base_k: int = 0     # residual prefix the chunked levels build on
    notes: list = dataclasses.field(default_factory=list)   # pairs left unchunked, why
    keep: str = "none"  # dot outputs recomputations start from (KEEP): F emits them stacked

    @property
    def residual_bytes(self) -> int:
        return sum(r.nbytes for p in self.pairs for r in p.residuals)


def find_pairs(jaxpr) -> list[ScanPair]:
    """Forward scans whose stacked ys a later scan of the same length reads as xs only."""
    eqns = jaxpr.eqns
    users: dict = {}
    for i, e in enumerate(eqns):
        for p, a in enumerate(e.invars):
            if ir.is_var(a):
                users.setdefault(a, []).append((i, p))
    outs = {v for v in jaxpr.outvars if ir.is_var(v)}
    pairs = []
    for fi, f in enumerate(eqns):
        if f.primitive.name != "scan" or ir.impure(f):
            continue
        nc, nk, nx = ir.scan_layout(f)
        body = f.params["jaxpr"].jaxpr
        if any(ir.is_literal(a) for a in f.invars[nc + nk:]):
            continue
        invars = set(body.invars)
        by_b: dict = {}
        thru: dict = {}
        for y, (outer, bv) in enumerate(zip(f.outvars[nk:], body.outvars[nk:])):
            if not ir.is_var(outer) or ir.is_dropvar(outer) or outer in outs:
                continue
            if not ir.is_var(bv) or bv in body.constvars:
                continue
            us = users.get(outer, [])
            bs = {i for i, _ in us}
            if len(bs) != 1:
                continue
            bi = next(iter(bs))
            b = eqns[bi]
            if b.primitive.name != "scan" or b.params["length"] != f.params["length"]:
                continue
            bnc, bnk, _ = ir.scan_layout(b)
            if any(p < bnc + bnk for _, p in us):
                continue  # read as a const or carry, not sliced per iteration
            if bv in invars:  # a carry or xs slice passed through: B has it, reuse it
                thru.setdefault(bi, {}).setdefault(bv, us[0][1])
                continue
            by_b.setdefault(bi, []).append(Residual(y, bv, outer, [p for _, p in us],
                                                    ir.aval_nbytes(outer.aval)))
        if by_b:  # one backward scan per forward scan: the one reading the most bytes
            bi = max(by_b, key=lambda i: sum(r.nbytes for r in by_b[i]))
            pairs.append(ScanPair(fi, bi, by_b[bi], int(f.params["length"]), thru.get(bi, {})))
    seen_b: set = set()  # a backward scan rewritten for two forward scans would clash
    return [p for p in pairs if not (p.b in seen_b or seen_b.add(p.b))]


def _cone(body, targets, avail, stop=None, kept=frozenset()):
    """Equations of ``body`` recomputing ``targets`` from leaves: ``avail`` vars (B
    already holds them), invars, constvars and outputs of equations ``stop`` accepts or
    ``kept`` lists. (eqn indices, leaves) or None."""
    producer = {}
    for i, e in enumerate(body.eqns):
        for v in e.outvars:
            if ir.is_var(v):
                producer[v] = i
    need = [t for t in targets]
    seen = set()
    picked, leaves = set(), []
    while need:
        v = need.pop()
        if v in seen or not ir.is_var(v):
            continue
        seen.add(v)
        if v in avail or v not in producer:
            leaves.append(v)
            continue
        i = producer[v]
        if i in picked:
            continue
        if i in kept and v in targets:
            return None
        if (i in kept or stop is not None and stop(body.eqns[i])) and v not in targets:
            leaves.append(v)
            continue
        if not recomputable(body.eqns[i]):
            return None
        picked.add(i)
        need.extend(a for a in body.eqns[i].invars if ir.is_var(a))
    # a comparison of a recomputed with a received value: F emits its result instead
    bad = split_compares(body.eqns, picked, set(_inner_vars(body)))
    if bad:
        return _cone(body, targets, avail, stop, kept | bad)
    return sorted(picked), leaves


def _inner_vars(body) -> list:
    """Vars the equations of ``body`` define."""
    return [v for e in body.eqns for v in e.outvars if ir.is_var(v)]


def _pair_cost(jaxpr, pair: ScanPair, drop: set, flops_cache: dict, stop=None):
    """(model bytes saved, FLOPs recomputed) when ``pair`` drops residuals ``drop``."""
    if not drop:
        return 0, 0.0
    f = pair.f_eqn(jaxpr)
    body = f.params["jaxpr"].jaxpr
    nc, nk, _ = ir.scan_layout(f)
    kept = {r.body_var for j, r in enumerate(pair.residuals) if j not in drop}
    kept |= set(pair.passthrough)
    got = _cone(body, [pair.residuals[j].body_var for j in drop], kept, stop)
    if got is None:
        return None
    picked, leaves = got
    # leaves F must now emit stacked: carries, and kept dot outputs of the body
    emitted = set(body.invars[nc:nc + nk]) | set(_inner_vars(body))
    extra = sum(ir.aval_nbytes(v.aval) for v in set(leaves) if v in emitted and v not in kept)
    saved = sum(pair.residuals[j].nbytes for j in drop) - extra * pair.length
    flops = 0.0
    for i in picked:
        if i not in flops_cache:
            flops_cache[i] = analysis.eqn_cost(body.eqns[i]).flops
        flops += flops_cache[i]
    return saved, flops * pair.length


def plan_scans(cj, keep: str = "none") -> ScanPlan:
    """Scan pairs of ``cj``'s top level and a greedy drop order (bytes saved per FLOP).

    ``keep`` (a :data:`KEEP` name): recomputations start from the dot outputs it names
    rather than recomputing them; then no carries are chunked."""
    jaxpr = cj.jaxpr if isinstance(cj, ir.ClosedJaxpr) else cj
    if keep not in KEEP:
        raise ValueError(f"remat: scan keep must be one of {sorted(KEEP)}, got {keep!r}")
    stop = KEEP[keep]
    pairs = find_pairs(jaxpr)
    caches = [dict() for _ in pairs]

    def kept_anyway(p, j):  # a residual the mode keeps: its own producer is a stop
        if stop is None:
            return False
        body = p.f_eqn(jaxpr).params["jaxpr"].jaxpr
        v = p.residuals[j].body_var
        return any(v in e.outvars and stop(e) for e in body.eqns)
    # residuals whose cone holds non-recomputable equations never drop
    items = [(pi, j) for pi, p in enumerate(pairs) for j in range(len(p.residuals))
             if not kept_anyway(p, j) and _pair_cost(jaxpr, p, {j}, caches[pi], stop) is not None]
    drop = [set() for _ in pairs]
    cur = [(0, 0.0) for _ in pairs]
    order, levels = [], [(0, 0, 0.0)]
    best_saved = 0
    left = list(items)
    while left:
        best = None
        for it in left:
            pi, j = it
            c = _pair_cost(jaxpr, pairs[pi], drop[pi] | {j}, caches[pi], stop)
            if c is None:
                continue
            gain, dfl = c[0] - cur[pi][0], c[1] - cur[pi][1]
            # positive gains by bytes per FLOP; else the least loss (it may pay off later)
            key = (gain > 0, gain / max(dfl, 1.0) if gain > 0 else gain)
            if best is None or key > best[0]:
                best = (key, it, c)
        if best is None:
            break
        _, (pi, j), c = best
        left.remove((pi, j))
        drop[pi].add(j)
        cur[pi] = c
        order.append((pi, j))
        saved = sum(s for s, _ in cur)
        if saved > best_saved:
            best_saved = saved
            levels.append((len(order), saved, sum(fl for _, fl in cur)))
    plan = ScanPlan(pairs, order, levels, base_k=levels[-1][0], keep=keep)
    if stop is None:
        plan_chunks(jaxpr, _drop_eqns(jaxpr, plan, plan.base_k), plan)
    return plan


def _stacked(aval, length):
    return aval.update(shape=(length,) + tuple(aval.shape))


@dataclasses.dataclass
class _Feed:
    """What B's equation must now take in for a recomputation, and the atoms its body
    reads each of the cone's leaves as."""
    in_atoms: list = dataclasses.field(default_factory=list)
    bconstvars: list = dataclasses.field(default_factory=list)  # closed consts of F's body
    bconsts: list = dataclasses.field(default_factory=list)
    const_in: list = dataclasses.field(default_factory=list)    # F's consts
    const_outer: list = dataclasses.field(default_factory=list)
    xs_in: list = dataclasses.field(default_factory=list)       # stacked carries/dots, F's xs
    xs_outer: list = dataclasses.field(default_factory=list)
    f_body_out: list = dataclasses.field(default_factory=list)  # carries and kept dots F emits
    f_outer: list = dataclasses.field(default_factory=list)


def _feed(f, b, leaves, avail: dict, L: int) -> _Feed:
    """Leaves of the recomputed cone -> atoms inside B's body, and what B must pass in."""
    fcj, bb = f.params["jaxpr"], b.params["jaxpr"].jaxpr
    fb = fcj.jaxpr
    nc, nk, _ = ir.scan_layout(f)
    bnc, bnk, _ = ir.scan_layout(b)
    out = _Feed()
    pos = {v: i for i, v in enumerate(fb.invars)}
    cpos = {v: i for i, v in enumerate(fb.constvars)}
    # An operand B already takes is not passed again: XLA copies a value that enters a
    # loop twice (GPT's attention mask, 1.25 MiB, kept twice through the backward).
    b_has = {("c", a): bb.invars[p] for p, a in enumerate(b.invars[:bnc]) if ir.is_var(a)}
    b_has.update({("x", a): bb.invars[p] for p, a in enumerate(b.invars)
                  if p >= bnc + bnk and ir.is_var(a)})
    for v in leaves:
        if v in avail:
            out.in_atoms.append(avail[v])
        elif v in cpos:
            nv = ir.new_var(v.aval)
            out.bconstvars.append(nv)
            out.bconsts.append(fcj.consts[cpos[v]])
            out.in_atoms.append(nv)
        elif v not in pos or nc <= pos[v] < nc + nk:
            # a carry, or a kept dot output of F's body: F emits it stacked
            stacked = ir.new_var(_stacked(v.aval, L))
            out.f_body_out.append(v)
            out.f_outer.append(stacked)
            nv = ir.new_var(v.aval)
            out.xs_in.append(nv)
            out.xs_outer.append(stacked)
            out.in_atoms.append(nv)
        else:
            i = pos[v]
            outer = f.invars[i]
            if ir.is_literal(outer):  # a literal const or xs: used as it is
                out.in_atoms.append(outer)
                continue
            key = ("c" if i < nc else "x", outer)
            if key not in b_has:
                nv = ir.new_var(v.aval)
                (out.const_in if i < nc else out.xs_in).append(nv)
                (out.const_outer if i < nc else out.xs_outer).append(outer)
                b_has[key] = nv
            out.in_atoms.append(b_has[key])
    return out


def _rewrite_pair(jaxpr, pair: ScanPair, drop: set, stop=None):
    """New (F eqn, B eqn) with the residuals ``drop`` recomputed inside B's body (from
    the outputs of F's equations ``stop`` accepts, which F then emits stacked)."""
    f, b = pair.f_eqn(jaxpr), pair.b_eqn(jaxpr)
    fcj = f.params["jaxpr"]
    fb, bb = fcj.jaxpr, b.params["jaxpr"].jaxpr
    nk = ir.scan_layout(f)[1]
    kept_res = [r for j, r in enumerate(pair.residuals) if j not in drop]
    dropped = [pair.residuals[j] for j in sorted(drop)]
    avail = {v: bb.invars[p] for v, p in pair.passthrough.items()}
    for r in kept_res:
        avail.setdefault(r.body_var, bb.invars[r.bpos[0]])
    picked, leaves = _cone(fb, [r.body_var for r in dropped], set(avail), stop)
    feed = _feed(f, b, leaves, avail, pair.length)
    cone = ir.make_jaxpr_from(fb, constvars=[], invars=list(leaves),
                              outvars=[r.body_var for r in dropped],
                              eqns=[fb.eqns[i] for i in picked], effects=frozenset())
    copied, outs = ir.copy_eqns(cone, feed.in_atoms)
    copied = [ir.eqn_with_name_stack(e, "remat") for e in copied]

    # F: drop the residual ys, emit the needed carries
    dropped_y = {r.y for r in dropped}
    keep_y = [y for y in range(len(f.outvars) - nk) if y not in dropped_y]
    f_body = ir.make_jaxpr_from(
        fb, outvars=list(fb.outvars[:nk]) + [fb.outvars[nk + y] for y in keep_y] + feed.f_body_out)
    f_body = ir.dce_same_interface(f_body)
    new_f = ir.replace_scan(
        f, jaxpr=ir.closed(f_body, fcj.consts),
        outvars=list(f.outvars[:nk]) + [f.outvars[nk + y] for y in keep_y] + feed.f_outer)
    sub = {bb.invars[p]: o for r, o in zip(dropped, outs) for p in r.bpos}
    return new_f, sink_broadcasts(jaxpr, _new_b(b, feed, copied, sub))


def _new_b(b, feed: _Feed, copied: list, sub: dict):
    """B taking its consts + F's consts, carries, kept xs + new xs, the recomputation
    ``copied`` at the top of its body, its reads of dropped residuals ``sub``stituted."""
    bcj = b.params["jaxpr"]
    bb = bcj.jaxpr
    bnc, bnk, _ = ir.scan_layout(b)
    dropped_pos = {p for p in range(len(bb.invars)) if bb.invars[p] in sub}
    xs_keep = [p for p in range(bnc + bnk, len(b.invars)) if p not in dropped_pos]
    b_invars = (list(bb.invars[:bnc]) + feed.const_in + list(bb.invars[bnc:bnc + bnk])
                + [bb.invars[p] for p in xs_keep] + feed.xs_in)
    b_eqns = copied + [e.replace(invars=[sub.get(a, a) if ir.is_var(a) else a
                                         for a in e.invars]) for e in bb.eqns]
    b_out = [sub.get(v, v) if ir.is_var(v) else v for v in bb.outvars]
    b_body = ir.make_jaxpr_from(bb, constvars=list(bb.constvars) + feed.bconstvars,
                                invars=b_invars, outvars=b_out, eqns=b_eqns)
    lin = list(b.params.get("linear", (False,) * len(b.invars)))
    b_lin = (lin[:bnc] + [False] * len(feed.const_in) + lin[bnc:bnc + bnk]
             + [lin[p] for p in xs_keep] + [False] * len(feed.xs_in))
    b_outer = (list(b.invars[:bnc]) + feed.const_outer + list(b.invars[bnc:bnc + bnk])
               + [b.invars[p] for p in xs_keep] + feed.xs_outer)
    return ir.replace_scan(b, jaxpr=ir.closed(b_body, list(bcj.consts) + feed.bconsts),
                           invars=b_outer, num_consts=bnc + len(feed.const_in), linear=b_lin)


def _drop_eqns(jaxpr, plan: ScanPlan, k: int, stats=None) -> list:
    """Top-level equations of ``jaxpr`` with the first ``k`` residuals dropped."""
    drop = [set() for _ in plan.pairs]
    for pi, j in plan.order[:k]:
        drop[pi].add(j)
    eqns = list(jaxpr.eqns)
    for pair, d in zip(plan.pairs, drop):
        if not d:
            continue
        eqns[pair.f], eqns[pair.b] = _rewrite_pair(jaxpr, pair, d, KEEP[plan.keep])
        if stats is not None:
            stats.hit("remat.scan_residuals_dropped", len(d))
            stats.note(f"remat: scan pair (eqns {pair.f}, {pair.b}, length {pair.length}): "
                       f"{len(d)}/{len(pair.residuals)} stacked residuals recomputed in the "
                       f"backward scan body")
    return eqns


def apply_scans(cj: ir.ClosedJaxpr, plan: ScanPlan, k: int, stats=None) -> ir.ClosedJaxpr:
    """``cj`` at level ``k``: the first ``k`` residuals of ``plan.order`` recomputed
    inside B, or for ``k > len(plan.order)`` the deepest prefix plus the first
    ``k - len(plan.order)`` pairs of ``plan.chunks`` chunked."""
    if k <= 0:
        return cj
    n_chunk = max(0, k - len(plan.order))
    eqns = _drop_eqns(cj.jaxpr, plan, plan.base_k if n_chunk else k, stats)
    if stats is not None and k == plan.levels[-1][0]:
        for note in plan.notes:
            stats.note(note)
    if not n_chunk:
        return ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=eqns), cj.consts)
    return apply_chunks(cj, eqns, plan.pairs, plan.chunks[:n_chunk], stats)


def level_desc(plan: ScanPlan, k: int) -> str:
    """What level ``k`` of ``plan`` does, in words (for the pass's notes)."""
    n_chunk = max(0, k - len(plan.order))
    drops = plan.base_k if n_chunk else k
    out = f"{drops}/{len(plan.order)} stacked residuals recomputed in the backward scan"
    if n_chunk:
        out += (f", carries of {n_chunk}/{len(plan.pairs)} scan pair(s) checkpointed every "
                + ", ".join(str(ch.size) for ch in plan.chunks[:n_chunk]) + " steps")
    if policy(plan.keep).desc:
        out += f", {policy(plan.keep).desc}"
    return out


def scan_rematerialized(jaxpr) -> bool:
    """Whether a top-level scan body already holds graphopt recomputations."""
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            if any(ir.name_stack(x).split("/")[0] == "remat"
                   for x in e.params["jaxpr"].jaxpr.eqns):
                return True
    return False


__all__ = ["ScanPair", "ScanPlan", "Residual", "Chunking", "KEEP", "KEEP_ORDER", "sink_broadcasts",
           "find_pairs", "plan_scans",
           "apply_scans", "level_desc", "scan_rematerialized"]


def choose_level(plan: ScanPlan, build, measure, base: int, floor: int, budget_bytes: int,
                 max_compiles: int = 5, stats=None):
    """Index into ``plan.levels`` of the cheapest prefix measuring <= ``budget_bytes``.

    ``build(k) -> program``, ``measure(program) -> bytes``; ``base`` is the level-0
    measurement, ``floor`` the last level's (which must meet the budget). Interpolates
    the model's bytes saved between the nearest levels measured over and under budget,
    then bisects (at most ``max_compiles`` compiles). Returns (index, program, bytes).
    """
    from graphopt import progress
    lv = plan.levels
    lo, hi = 0, len(lv) - 1
    meas = {lo: (None, base), hi: (None, floor)}
    with progress.bar(max_compiles, "remat: scan levels", leave=False) as pbar:
        for _ in range(max_compiles):
            if hi - lo <= 1:
                break
            (_, m_lo), (_, m_hi) = meas[lo], meas[hi]
            s_lo, s_hi = lv[lo][1], lv[hi][1]
            want = s_lo + (m_lo - budget_bytes) * (s_hi - s_lo) / max(m_lo - m_hi, 1)
            idx = next((i for i in range(lo + 1, hi) if lv[i][1] >= want), hi - 1)
            prog = build(lv[idx][0])
            meas[idx] = (prog, measure(prog))
            pbar.update()
            if stats is not None:
                stats.note(f"remat: scan level {level_desc(plan, lv[idx][0])}: "
                           f"measured {analysis.fmt_bytes(meas[idx][1])}")
            if meas[idx][1] <= budget_bytes:
                hi = idx
            else:
                lo = idx
    prog, mem = meas[hi]
    return hi, (prog if prog is not None else build(lv[hi][0])), mem


__all__ += ["choose_level"]
