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
(:func:`plan_scans`); the ``remat`` pass measures prefixes of it against the budget.

Deeper levels chunk the stacked carries (the sqrt(L) / nested scan checkpoint), on top
of the deepest prefix, one pair per level (:class:`Chunking`, most bytes per FLOP first):

- F becomes an outer scan over L/c chunks of an inner scan of c steps (xs reshaped
  [L/c, c, ...], ys reshaped back) and emits its carries only at chunk starts: those B
  reads stacked plus the carries they depend on (a fixed point over F's body);
- B becomes an outer scan over chunks whose body first regenerates the chunk's c stacked
  carries by re-running the carry part of F's body from the checkpoint (a ``remat``
  scoped scan), then runs B's body as an inner scan over the c steps. Directions follow
  F and B, so slices line up as above. Every step's carries are recomputed once.
- c divides L and minimizes the model's live bytes: L/c checkpoints, one chunk of
  regenerated carries and the chunk B's outer loop copies out of each of its other xs.
  A pair whose length has no divisor, or where no c saves bytes (GPT's 4 layers), stays
  unchunked, with a note.

Must not: drop a residual or chunk a carry that something other than B reads (it stays
alive anyway), recompute random, effectful or unknown primitives (see
:func:`.remat_plan.recomputable`), or touch scans whose xs are literals.
"""
from __future__ import annotations

import dataclasses

import jax
from jax import lax

from graphopt import analysis, ir

from .remat_plan import recomputable


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
class Chunking:
    pair: int           # index into ScanPlan.pairs
    size: int           # steps per chunk (divides the pair's length)
    carries: list       # carry indices F checkpoints at chunk starts
    stacks: list        # (F ys index, carry index) of the stacked carries B reads
    saved: int          # model bytes saved over the unchunked pair
    flops: float        # carry recomputation (every step once more)


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

    @property
    def residual_bytes(self) -> int:
        return sum(r.nbytes for p in self.pairs for r in p.residuals)


def _layout(eqn):
    """(num consts, num carry, num xs) of a scan equation."""
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    return nc, nk, len(eqn.invars) - nc - nk


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
        nc, nk, nx = _layout(f)
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
            bnc, bnk, _ = _layout(b)
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


def _cone(body, targets, avail):
    """Equations of ``body`` recomputing ``targets`` from leaves: ``avail`` vars (B
    already holds them), invars and constvars. (eqn indices, leaves) or None."""
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
        if not recomputable(body.eqns[i]):
            return None
        picked.add(i)
        need.extend(a for a in body.eqns[i].invars if ir.is_var(a))
    return sorted(picked), leaves


def _pair_cost(jaxpr, pair: ScanPair, drop: set, flops_cache: dict):
    """(model bytes saved, FLOPs recomputed) when ``pair`` drops residuals ``drop``."""
    if not drop:
        return 0, 0.0
    f = pair.f_eqn(jaxpr)
    body = f.params["jaxpr"].jaxpr
    nc, nk, _ = _layout(f)
    kept = {r.body_var for j, r in enumerate(pair.residuals) if j not in drop}
    kept |= set(pair.passthrough)
    got = _cone(body, [pair.residuals[j].body_var for j in drop], kept)
    if got is None:
        return None
    picked, leaves = got
    carries = set(body.invars[nc:nc + nk])
    extra = sum(ir.aval_nbytes(v.aval) for v in set(leaves) if v in carries and v not in kept)
    saved = sum(pair.residuals[j].nbytes for j in drop) - extra * pair.length
    flops = 0.0
    for i in picked:
        if i not in flops_cache:
            flops_cache[i] = analysis.eqn_cost(body.eqns[i]).flops
        flops += flops_cache[i]
    return saved, flops * pair.length


def plan_scans(cj) -> ScanPlan:
    """Scan pairs of ``cj``'s top level and a greedy drop order (bytes saved per FLOP)."""
    jaxpr = cj.jaxpr if isinstance(cj, ir.ClosedJaxpr) else cj
    pairs = find_pairs(jaxpr)
    caches = [dict() for _ in pairs]
    # residuals whose cone holds non-recomputable equations never drop
    items = [(pi, j) for pi, p in enumerate(pairs) for j in range(len(p.residuals))
             if _pair_cost(jaxpr, p, {j}, caches[pi]) is not None]
    drop = [set() for _ in pairs]
    cur = [(0, 0.0) for _ in pairs]
    order, levels = [], [(0, 0, 0.0)]
    best_saved = 0
    left = list(items)
    while left:
        best = None
        for it in left:
            pi, j = it
            c = _pair_cost(jaxpr, pairs[pi], drop[pi] | {j}, caches[pi])
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
    plan = ScanPlan(pairs, order, levels, base_k=levels[-1][0])
    _plan_chunks(jaxpr, plan)
    return plan


def _plan_chunks(jaxpr, plan: ScanPlan) -> None:
    """Deeper levels: on top of the deepest prefix, pairs whose stacked carries shrink
    when F checkpoints them every ``size`` steps and B regenerates each chunk."""
    eqns = _drop_eqns(jaxpr, plan, plan.base_k)
    users: dict = {}
    for i, e in enumerate(eqns):
        for a in e.invars:
            if ir.is_var(a):
                users.setdefault(a, set()).add(i)
    outs = {v for v in jaxpr.outvars if ir.is_var(v)}
    found = []
    for pi, pair in enumerate(plan.pairs):
        got = _chunking(eqns[pair.f], eqns[pair.b], pair.b, users, outs, pair.length)
        if isinstance(got, str):
            plan.notes.append(f"remat: scan pair (eqns {pair.f}, {pair.b}, length "
                              f"{pair.length}): carries not chunked, {got}")
        else:
            got.pair = pi
            found.append(got)
    found.sort(key=lambda c: c.saved / max(c.flops, 1.0), reverse=True)
    _, saved, flops = plan.levels[-1]
    for n, ch in enumerate(found, 1):
        saved, flops = saved + ch.saved, flops + ch.flops
        plan.levels.append((len(plan.order) + n, saved, flops))
    plan.chunks = found


def _regen_body(fb, nc: int, nk: int, need: list):
    """F's body cut down to regenerate the carries ``need`` step by step: (carry indices
    it threads, jaxpr [used consts, those carries, used xs] -> [their next values, the
    ``need`` carry inputs], used const indices, used xs indices), or why it cannot."""
    carries = list(fb.invars[nc:nc + nk])
    S = set(need)
    while True:  # the carries those need depend on, to a fixed point
        j = _dce_body(ir.make_jaxpr_from(
            fb, outvars=[fb.outvars[s] for s in sorted(S)] + [carries[n] for n in need]),
            keep_impure=False)  # dropout beside the carry path does not block it
        used = {a for e in j.eqns for a in e.invars if ir.is_var(a)}
        used |= {v for v in j.outvars if ir.is_var(v)}
        S2 = S | {s for s in range(nk) if carries[s] in used}
        if S2 == S:
            break
        S = S2
    bad = next((e for e in j.eqns if not recomputable(e)), None)
    if bad is not None:
        return (f"regenerating them would recompute {bad.primitive.name} (random, "
                "effectful, unknown or not worth recomputing)")
    S = sorted(S)
    ci = [i for i in range(nc) if fb.invars[i] in used]
    xi = [i for i in range(len(fb.invars) - nc - nk) if fb.invars[nc + nk + i] in used]
    j = ir.make_jaxpr_from(j, invars=[fb.invars[i] for i in ci] + [carries[s] for s in S]
                           + [fb.invars[nc + nk + i] for i in xi])
    return S, j, ci, xi


def _stack_pos(f, b, stacks) -> dict:
    """B's invar positions reading F's stacked carries -> (F ys index, carry index)."""
    nk, (bnc, bnk, _) = f.params["num_carry"], _layout(b)
    return {p: (y, j) for y, j in stacks for p in range(bnc + bnk, len(b.invars))
            if b.invars[p] is f.outvars[nk + y]}


def _chunk_xs(f, b, stacks, xi) -> list:
    """The outer atoms B'' slices per chunk, each once: B's other xs, then the xs of F
    that the carry regeneration reads."""
    nc, nk, _ = _layout(f)
    bnc, bnk, _ = _layout(b)
    pos = _stack_pos(f, b, stacks)
    return list(dict.fromkeys([b.invars[p] for p in range(bnc + bnk, len(b.invars))
                               if p not in pos] + [f.invars[nc + nk + i] for i in xi]))


def _chunking(f, b, bi: int, users: dict, outs: set, L: int):
    """A :class:`Chunking` of the (rewritten) pair ``f``, ``b`` or why there is none."""
    nc, nk, _ = _layout(f)
    fb = f.params["jaxpr"].jaxpr
    carries = list(fb.invars[nc:nc + nk])
    bnc, bnk, _ = _layout(b)
    sliced = ({a for a in b.invars[bnc + bnk:] if ir.is_var(a)}
              - {a for a in b.invars[:bnc + bnk] if ir.is_var(a)})
    stacks = []  # F's ys that are its carry inputs, stacked, read by B alone, as xs
    for y, (outer, bv) in enumerate(zip(f.outvars[nk:], fb.outvars[nk:])):
        if (ir.is_var(bv) and bv in carries and ir.is_var(outer) and outer not in outs
                and users.get(outer) == {bi} and outer in sliced):
            stacks.append((y, carries.index(bv)))
    if not stacks:
        return "B reads no stacked carry"
    need = list(dict.fromkeys(j for _, j in stacks))
    got = _regen_body(fb, nc, nk, need)
    if isinstance(got, str):
        return got
    S, regen, _, xi = got
    bn = sum(ir.aval_nbytes(carries[j].aval) for j in need)
    bs = sum(ir.aval_nbytes(carries[j].aval) for j in S)
    bx = sum(ir.aval_nbytes(a.aval) for a in _chunk_xs(f, b, stacks, xi)) // L
    # live: L/c checkpoints of the threaded carries, one chunk of regenerated ones and
    # the chunk B's outer loop slices out of each of its other xs (XLA copies it)
    cost = {c: (L // c) * bs + c * (bn + bx) for c in range(2, L) if L % c == 0}
    if not cost:
        return f"length {L} has no divisor to chunk by"
    c = min(cost, key=lambda c: (cost[c], -c))
    saved = L * bn - cost[c]
    if saved <= 0:
        return f"chunks of {c} steps would save nothing at length {L}"
    flops = L * sum(analysis.eqn_cost(e).flops for e in regen.eqns)
    return Chunking(-1, c, S, stacks, saved, flops)


def _stacked(aval, length):
    return aval.update(shape=(length,) + tuple(aval.shape))


def _dce_body(body, keep_impure: bool = True):
    """``body`` without equations nothing reads (effectful and random ones stay unless
    ``keep_impure`` is False: a slice that only recomputes); same interface."""
    need = {v for v in body.outvars if ir.is_var(v)}
    kept = []
    for e in reversed(body.eqns):
        if (keep_impure and ir.impure(e)) or any(ir.is_var(v) and v in need for v in e.outvars):
            kept.append(e)
            need.update(a for a in e.invars if ir.is_var(a))
    kept.reverse()
    return ir.make_jaxpr_from(body, eqns=kept)


def _rewrite_pair(jaxpr, pair: ScanPair, drop: set):
    """New (F eqn, B eqn) with the residuals ``drop`` recomputed inside B's body."""
    f, b = pair.f_eqn(jaxpr), pair.b_eqn(jaxpr)
    fcj, bcj = f.params["jaxpr"], b.params["jaxpr"]
    fb, bb = fcj.jaxpr, bcj.jaxpr
    nc, nk, nx = _layout(f)
    bnc, bnk, bnx = _layout(b)
    L = pair.length
    kept_res = [r for j, r in enumerate(pair.residuals) if j not in drop]
    dropped = [pair.residuals[j] for j in sorted(drop)]
    avail = {v: bb.invars[p] for v, p in pair.passthrough.items()}
    for r in kept_res:
        avail.setdefault(r.body_var, bb.invars[r.bpos[0]])
    picked, leaves = _cone(fb, [r.body_var for r in dropped], set(avail))

    # leaves -> atoms inside B's body, and what B's equation must pass in
    new_bconstvars, new_bconsts = [], []      # closed consts of F's body
    new_const_in, new_const_outer = [], []    # F's consts
    new_xs_in, new_xs_outer = [], []          # stacked carries and F's xs
    new_f_body_out, new_f_outer = [], []      # carries F now emits
    pos = {v: i for i, v in enumerate(fb.invars)}
    cpos = {v: i for i, v in enumerate(fb.constvars)}
    in_atoms = []
    for v in leaves:
        if v in avail:
            in_atoms.append(avail[v])
        elif v in cpos:
            nv = ir.new_var(v.aval)
            new_bconstvars.append(nv)
            new_bconsts.append(fcj.consts[cpos[v]])
            in_atoms.append(nv)
        else:
            i = pos[v]
            outer = f.invars[i]
            if i < nc:
                if ir.is_literal(outer):
                    in_atoms.append(outer)
                    continue
                nv = ir.new_var(v.aval)
                new_const_in.append(nv)
                new_const_outer.append(outer)
            elif i < nc + nk:
                stacked = ir.new_var(_stacked(v.aval, L))
                new_f_body_out.append(v)
                new_f_outer.append(stacked)
                nv = ir.new_var(v.aval)
                new_xs_in.append(nv)
                new_xs_outer.append(stacked)
            else:
                nv = ir.new_var(v.aval)
                new_xs_in.append(nv)
                new_xs_outer.append(outer)
            in_atoms.append(nv)
    cone = ir.make_jaxpr_from(fb, constvars=[], invars=list(leaves),
                              outvars=[r.body_var for r in dropped],
                              eqns=[fb.eqns[i] for i in picked], effects=frozenset())
    copied, outs = ir.copy_eqns(cone, in_atoms)
    copied = [ir.eqn_with_name_stack(e, "remat") for e in copied]

    # F: drop the residual ys, emit the needed carries
    dropped_y = {r.y for r in dropped}
    keep_y = [y for y in range(len(f.outvars) - nk) if y not in dropped_y]
    f_body = ir.make_jaxpr_from(
        fb, outvars=list(fb.outvars[:nk]) + [fb.outvars[nk + y] for y in keep_y] + new_f_body_out)
    f_body = _dce_body(f_body)
    new_f = f.replace(
        params={**f.params, "jaxpr": ir.closed(f_body, fcj.consts)},
        outvars=list(f.outvars[:nk]) + [f.outvars[nk + y] for y in keep_y] + new_f_outer)

    # B: consts + F's consts, carries, kept xs + new xs; recompute at the top of the body
    dropped_pos = {p for r in dropped for p in r.bpos}
    sub = {}
    for r, o in zip(dropped, outs):
        for p in r.bpos:
            sub[bb.invars[p]] = o
    xs_keep = [p for p in range(bnc + bnk, len(b.invars)) if p not in dropped_pos]
    b_invars = (list(bb.invars[:bnc]) + new_const_in + list(bb.invars[bnc:bnc + bnk])
                + [bb.invars[p] for p in xs_keep] + new_xs_in)
    b_eqns = copied + [e.replace(invars=[sub.get(a, a) if ir.is_var(a) else a
                                         for a in e.invars]) for e in bb.eqns]
    b_out = [sub.get(v, v) if ir.is_var(v) else v for v in bb.outvars]
    b_body = ir.make_jaxpr_from(bb, constvars=list(bb.constvars) + new_bconstvars,
                                invars=b_invars, outvars=b_out, eqns=b_eqns)
    lin = list(b.params.get("linear", (False,) * len(b.invars)))
    b_lin = (lin[:bnc] + [False] * len(new_const_in) + lin[bnc:bnc + bnk]
             + [lin[p] for p in xs_keep] + [False] * len(new_xs_in))
    b_outer = (list(b.invars[:bnc]) + new_const_outer + list(b.invars[bnc:bnc + bnk])
               + [b.invars[p] for p in xs_keep] + new_xs_outer)
    params = {**b.params, "jaxpr": ir.closed(b_body, list(bcj.consts) + new_bconsts),
              "num_consts": bnc + len(new_const_in)}
    if "linear" in b.params:
        params["linear"] = tuple(b_lin)
    new_b = b.replace(invars=b_outer, params=params)
    return new_f, new_b


def _drop_eqns(jaxpr, plan: ScanPlan, k: int, stats=None) -> list:
    """Top-level equations of ``jaxpr`` with the first ``k`` residuals dropped."""
    drop = [set() for _ in plan.pairs]
    for pi, j in plan.order[:k]:
        drop[pi].add(j)
    eqns = list(jaxpr.eqns)
    for pair, d in zip(plan.pairs, drop):
        if not d:
            continue
        eqns[pair.f], eqns[pair.b] = _rewrite_pair(jaxpr, pair, d)
        if stats is not None:
            stats.hit("remat.scan_residuals_dropped", len(d))
            stats.note(f"remat: scan pair (eqns {pair.f}, {pair.b}, length {pair.length}): "
                       f"{len(d)}/{len(pair.residuals)} stacked residuals recomputed in the "
                       f"backward scan body")
    return eqns


def _scan_fn(fn, consts, nk: int):
    """A ``lax.scan`` step running the flat function ``fn(*consts, *carry, *x)``."""
    def step(carry, x):
        out = fn(*consts, *carry, *x)
        return list(out[:nk]), list(out[nk:])
    return step


def _chunk_pair(f, b, ch: Chunking, L: int):
    """(F'', B''): F as an outer scan over chunks of ``ch.size`` steps that also emits
    the chunk-start carries; B as an outer scan over chunks whose body regenerates the
    chunk's stacked carries (``remat`` scope), then runs B's body over its steps.
    Functions to trace and inline: F'' is (fn, in atoms, F outvars it replaces) and
    returns them plus the checkpoints; B'' is (fn, in atoms, chunked xs, B outvars),
    its atoms being ``in atoms + checkpoints + chunked xs``."""
    nc, nk, _ = _layout(f)
    bnc, bnk, _ = _layout(b)
    fcj = f.params["jaxpr"]
    fb = fcj.jaxpr
    c, n = ch.size, L // ch.size
    frev, brev = bool(f.params["reverse"]), bool(b.params["reverse"])
    # the user's unroll applies to the steps, which now run in the inner scans
    funroll, bunroll = f.params.get("unroll", 1), b.params.get("unroll", 1)
    stack_y = {y for y, _ in ch.stacks}
    keep_y = [y for y in range(len(f.outvars) - nk) if y not in stack_y]
    f_body = _dce_body(ir.make_jaxpr_from(
        fb, outvars=list(fb.outvars[:nk]) + [fb.outvars[nk + y] for y in keep_y]))
    f_fun = ir.jaxpr_as_fun(ir.closed(f_body, fcj.consts))
    S, regen, ci, xi = _regen_body(fb, nc, nk, [j for _, j in ch.stacks])
    regen_fun = ir.jaxpr_as_fun(ir.closed(regen, fcj.consts))
    b_fun = ir.jaxpr_as_fun(b.params["jaxpr"])

    def chunked(x):  # [L, ...] -> [L/c, c, ...]
        return x.reshape((n, c) + x.shape[1:])

    def joined(y):
        return y.reshape((L,) + y.shape[2:])

    def f_new(*a):
        consts, carry, xs = a[:nc], list(a[nc:nc + nk]), [chunked(x) for x in a[nc + nk:]]

        def outer(cr, xc):
            cr2, ys = lax.scan(_scan_fn(f_fun, consts, nk), cr, xc, length=c, reverse=frev,
                               unroll=funroll)
            return cr2, ([cr[s] for s in S], ys)
        cr, (cks, ys) = lax.scan(outer, carry, xs, length=n, reverse=frev)
        return [*cr, *map(joined, ys), *cks]

    # B'' reads B's consts and carries, F's consts, the checkpoints and its chunked xs
    bpos = _stack_pos(f, b, ch.stacks)
    src = _chunk_xs(f, b, ch.stacks, xi)
    need = list(dict.fromkeys(j for _, j in ch.stacks))

    def b_new(*a):
        bconsts, bcarry = a[:bnc], list(a[bnc:bnc + bnk])
        a = a[bnc + bnk:]
        fconsts, cks, xs = a[:len(ci)], a[len(ci):len(ci) + len(S)], a[len(ci) + len(S):]

        def outer(cr, chunk):
            ck, xc = chunk
            got = dict(zip(src, xc))
            with jax.named_scope("remat"):  # marks the recomputation (scan_rematerialized)
                _, regen_ys = lax.scan(_scan_fn(regen_fun, fconsts, len(S)), list(ck),
                                       [got[f.invars[nc + nk + i]] for i in xi],
                                       length=c, reverse=frev, unroll=funroll)
            bx = [regen_ys[need.index(bpos[p][1])] if p in bpos else got[b.invars[p]]
                  for p in range(bnc + bnk, len(b.invars))]
            return lax.scan(_scan_fn(b_fun, bconsts, bnk), cr, bx, length=c, reverse=brev,
                            unroll=bunroll)
        cr, ys = lax.scan(outer, bcarry, (list(cks), [chunked(x) for x in xs]),
                          length=n, reverse=brev)
        return [*cr, *map(joined, ys)]

    f_out = list(f.outvars[:nk]) + [f.outvars[nk + y] for y in keep_y]
    b_in = list(b.invars[:bnc + bnk]) + [f.invars[i] for i in ci]  # + checkpoints, src
    return (f_new, list(f.invars), f_out), (b_new, b_in, src, list(b.outvars))


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
    at: dict = {}      # eqn index -> replacement equations
    sub: dict = {}     # old var -> new atom
    cvars, consts = [], []
    for ch in plan.chunks[:n_chunk]:
        pair = plan.pairs[ch.pair]
        f, b = eqns[pair.f], eqns[pair.b]
        (f_fn, f_in, f_out), (b_fn, b_in, src, b_out) = _chunk_pair(f, b, ch, pair.length)
        inl_f = ir.inline(f_fn, f_in)
        inl_b = ir.inline(b_fn, b_in + inl_f.outs[len(f_out):] + src)
        for i, e, inl, old in ((pair.f, f, inl_f, f_out), (pair.b, b, inl_b, b_out)):
            # the original equation's name stack keeps the forward/backward split visible
            at[i] = [x.replace(source_info=e.source_info) for x in inl.eqns]
            sub.update((o, v) for o, v in zip(old, inl.outs) if not ir.is_dropvar(o))
            cvars += [v for v, _ in inl.consts]
            consts += [x for _, x in inl.consts]
        if stats is not None:
            stats.hit("remat.scan_carries_chunked")
            stats.note(f"remat: scan pair (eqns {pair.f}, {pair.b}, length {pair.length}): "
                       f"carries checkpointed every {ch.size} steps; the backward scan "
                       f"regenerates each chunk's {ch.size} carries")
    new = []
    for i, e in enumerate(eqns):
        for x in at.get(i, [e]):
            ins = [sub.get(a, a) if ir.is_var(a) else a for a in x.invars]
            new.append(x.replace(invars=ins) if ins != list(x.invars) else x)
    outvars = [sub.get(v, v) if ir.is_var(v) else v for v in cj.jaxpr.outvars]
    jaxpr = ir.make_jaxpr_from(cj.jaxpr, constvars=list(cj.jaxpr.constvars) + cvars,
                               outvars=outvars, eqns=new)
    return ir.closed(jaxpr, list(cj.consts) + consts)


def level_desc(plan: ScanPlan, k: int) -> str:
    """What level ``k`` of ``plan`` does, in words (for the pass's notes)."""
    n_chunk = max(0, k - len(plan.order))
    drops = plan.base_k if n_chunk else k
    out = f"{drops}/{len(plan.order)} stacked residuals recomputed in the backward scan"
    if n_chunk:
        out += (f", carries of {n_chunk}/{len(plan.pairs)} scan pair(s) checkpointed every "
                + ", ".join(str(ch.size) for ch in plan.chunks[:n_chunk]) + " steps")
    return out


def scan_rematerialized(jaxpr) -> bool:
    """Whether a top-level scan body already holds graphopt recomputations."""
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            if any(ir.name_stack(x).split("/")[0] == "remat"
                   for x in e.params["jaxpr"].jaxpr.eqns):
                return True
    return False


__all__ = ["ScanPair", "ScanPlan", "Residual", "Chunking", "find_pairs", "plan_scans",
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
