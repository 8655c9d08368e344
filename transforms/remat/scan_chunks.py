"""Chunked scan carries (sqrt(L) checkpointing): the deeper levels of :mod:`.scan`.

On top of the deepest residual prefix, a forward/backward scan pair (F, B) whose F
emits its carry inputs stacked for B alone is rewritten so the stack shrinks:

- F becomes an outer scan over L/c chunks of an inner scan of c steps (xs reshaped
  [L/c, c, ...], ys reshaped back) and emits its carries only at chunk starts: those B
  reads stacked plus the carries they depend on (a fixed point over F's body);
- B becomes an outer scan over chunks whose body first regenerates the chunk's c stacked
  carries by re-running the carry part of F's body from the checkpoint (a ``remat``
  scoped scan), then runs B's body as an inner scan over the c steps.
- c divides L and minimizes the model's live bytes: L/c checkpoints, one chunk of
  regenerated carries and the chunk B's outer loop copies out of each of its other xs.

Also here, for both B rewrites: a constant B takes that is a broadcast of a far smaller
value enters B as that value and is broadcast again inside (:func:`sink_broadcasts`).

Must not: chunk a carry something other than B reads, or regenerate through random,
effectful or unknown primitives (see :func:`.plan.recomputable`).
"""
from __future__ import annotations

import dataclasses

import jax
from jax import lax

from graphopt import analysis, ir

from .plan import recomputable


@dataclasses.dataclass
class Chunking:
    pair: int           # index into ScanPlan.pairs
    size: int           # steps per chunk (divides the pair's length)
    carries: list       # carry indices F checkpoints at chunk starts
    stacks: list        # (F ys index, carry index) of the stacked carries B reads
    saved: int          # model bytes saved over the unchunked pair
    flops: float        # carry recomputation (every step once more)


def plan_chunks(jaxpr, eqns, plan) -> None:
    """Deeper levels: on top of the deepest prefix, pairs whose stacked carries shrink
    when F checkpoints them every ``size`` steps and B regenerates each chunk. ``eqns``:
    the top level at ``plan.base_k`` (residuals dropped); adds ``plan.levels``,
    ``plan.chunks`` and ``plan.notes``."""
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
        j = ir.dce_same_interface(ir.make_jaxpr_from(
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
    (_, nk, _), (bnc, bnk, _) = ir.scan_layout(f), ir.scan_layout(b)
    return {p: (y, j) for y, j in stacks for p in range(bnc + bnk, len(b.invars))
            if b.invars[p] is f.outvars[nk + y]}


def _chunk_xs(f, b, stacks, xi) -> list:
    """The outer atoms B'' slices per chunk, each once: B's other xs, then the xs of F
    that the carry regeneration reads."""
    nc, nk, _ = ir.scan_layout(f)
    bnc, bnk, _ = ir.scan_layout(b)
    pos = _stack_pos(f, b, stacks)
    return list(dict.fromkeys([b.invars[p] for p in range(bnc + bnk, len(b.invars))
                               if p not in pos] + [f.invars[nc + nk + i] for i in xi]))


def _chunking(f, b, bi: int, users: dict, outs: set, L: int):
    """A :class:`Chunking` of the (rewritten) pair ``f``, ``b`` or why there is none."""
    nc, nk, _ = ir.scan_layout(f)
    fb = f.params["jaxpr"].jaxpr
    carries = list(fb.invars[nc:nc + nk])
    bnc, bnk, _ = ir.scan_layout(b)
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


def _scan_fn(fn, consts, nk: int):
    """A ``lax.scan`` step running the flat function ``fn(*consts, *carry, *x)``."""
    def step(carry, x):
        out = fn(*consts, *carry, *x)
        return list(out[:nk]), list(out[nk:])
    return step


def chunk_pair(f, b, ch: Chunking, L: int):
    """(F'', B''): F as an outer scan over chunks of ``ch.size`` steps that also emits
    the chunk-start carries; B as an outer scan over chunks whose body regenerates the
    chunk's stacked carries (``remat`` scope), then runs B's body over its steps.
    Functions to trace and inline: F'' is (fn, in atoms, F outvars it replaces) and
    returns them plus the checkpoints; B'' is (fn, in atoms, chunked xs, B outvars),
    its atoms being ``in atoms + checkpoints + chunked xs``."""
    nc, nk, _ = ir.scan_layout(f)
    bnc, bnk, _ = ir.scan_layout(b)
    fcj = f.params["jaxpr"]
    fb = fcj.jaxpr
    c, n = ch.size, L // ch.size
    frev, brev = bool(f.params["reverse"]), bool(b.params["reverse"])
    # the user's unroll applies to the steps, which now run in the inner scans
    funroll, bunroll = f.params.get("unroll", 1), b.params.get("unroll", 1)
    stack_y = {y for y, _ in ch.stacks}
    keep_y = [y for y in range(len(f.outvars) - nk) if y not in stack_y]
    f_body = ir.dce_same_interface(ir.make_jaxpr_from(
        fb, outvars=list(fb.outvars[:nk]) + [fb.outvars[nk + y] for y in keep_y]))
    f_fun = ir.jaxpr_as_fun(ir.closed(f_body, fcj.consts))
    S, regen, ci, xi = _regen_body(fb, nc, nk, [j for _, j in ch.stacks])
    # F's consts B already takes are read from B's own (a value passed into a loop twice
    # is copied)
    bconst_at = {a: p for p, a in enumerate(b.invars[:bnc]) if ir.is_var(a)}
    shared = {i: bconst_at[f.invars[i]] for i in ci
              if ir.is_var(f.invars[i]) and f.invars[i] in bconst_at}
    ci_in = [i for i in ci if i not in shared]
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
        extra, cks, xs = a[:len(ci_in)], a[len(ci_in):len(ci_in) + len(S)], a[len(ci_in) + len(S):]
        given = dict(zip(ci_in, extra))
        fconsts = [bconsts[shared[i]] if i in shared else given[i] for i in ci]

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
    b_in = list(b.invars[:bnc + bnk]) + [f.invars[i] for i in ci_in]  # + checkpoints, src
    return (f_new, list(f.invars), f_out), (b_new, b_in, src, list(b.outvars))


def apply_chunks(cj: ir.ClosedJaxpr, eqns: list, pairs: list, chunks: list,
                 stats=None) -> ir.ClosedJaxpr:
    """``cj``'s top level ``eqns`` with the pairs of ``chunks`` chunked (traced, inlined)."""
    at: dict = {}      # eqn index -> replacement equations
    sub: dict = {}     # old var -> new atom
    cvars, consts = [], []
    for ch in chunks:
        pair = pairs[ch.pair]
        f, b = eqns[pair.f], eqns[pair.b]
        (f_fn, f_in, f_out), (b_fn, b_in, src, b_out) = chunk_pair(f, b, ch, pair.length)
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


# ------------------------------------------------------------------ B's constants

def _broadcast_source(jaxpr, producer: dict, a):
    """(operand, shape, dims) when top-level ``a`` is a broadcast (alone or as an output of
    a jit, like ``jnp.where``'s) of a value at least 8 times smaller, else None."""
    i = producer.get(a)
    if i is None:
        return None
    e = jaxpr.eqns[i]
    src = be = None
    if e.primitive.name == "broadcast_in_dim":
        src, be = e.invars[0], e
    elif e.primitive.name in ("jit", "pjit") and not ir.impure(e):
        inner = ir.as_closed(e.params["jaxpr"]).jaxpr
        ov = inner.outvars[e.outvars.index(a)]
        be = next((x for x in inner.eqns if ov in x.outvars), None)
        if be is None or be.primitive.name != "broadcast_in_dim":
            return None
        src = be.invars[0]
        if ir.is_var(src):
            if src not in inner.invars:
                return None
            src = e.invars[inner.invars.index(src)]
    if be is None or be.params.get("sharding") is not None:
        return None
    if ir.aval_nbytes(src.aval) * 8 > ir.aval_nbytes(a.aval):
        return None
    return src, tuple(be.params["shape"]), tuple(be.params["broadcast_dimensions"])


def sink_broadcasts(jaxpr, b):
    """Scan ``b`` taking its broadcast constants' small sources instead, broadcast again at
    the top of its body: a big constant entering the loop stays alive for the whole loop
    (GPT's attention mask and its fill values, [B, N, T, T] each, through the backward;
    ``jax.checkpoint`` in the body recomputes them)."""
    nc, _, _ = ir.scan_layout(b)
    producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars if ir.is_var(v)}
    body = b.params["jaxpr"]
    bb = body.jaxpr
    lin = list(b.params.get("linear", (False,) * len(b.invars)))
    found = [_broadcast_source(jaxpr, producer, a) if ir.is_var(a) else None
             for a in b.invars[:nc]]
    keep_in, keep_body, keep_lin, pre, sub = [], [], [], [], {}
    inside = {}  # outer operand -> body var: each source enters the loop once
    for p in range(nc):
        if found[p] is None:
            keep_in.append(b.invars[p])
            keep_body.append(bb.invars[p])
            keep_lin.append(lin[p])
            if ir.is_var(b.invars[p]):
                inside.setdefault(b.invars[p], bb.invars[p])
    for p in range(nc):
        if found[p] is None:
            continue
        src, shape, dims = found[p]
        inner_src = src
        if ir.is_var(src):
            if src not in inside:
                inside[src] = ir.new_var(src.aval)
                keep_in.append(src)
                keep_body.append(inside[src])
                keep_lin.append(False)
            inner_src = inside[src]
        inl = ir.inline(lambda x, shape=shape, dims=dims: lax.broadcast_in_dim(x, shape, dims),
                        [inner_src])
        pre.extend(inl.eqns)
        sub[bb.invars[p]] = inl.outs[0]
    if not sub:
        return b
    eqns = pre + [e.replace(invars=[sub.get(x, x) if ir.is_var(x) else x for x in e.invars])
                  for e in bb.eqns]
    outvars = [sub.get(v, v) if ir.is_var(v) else v for v in bb.outvars]
    new_body = ir.make_jaxpr_from(bb, invars=keep_body + list(bb.invars[nc:]),
                                  outvars=outvars, eqns=eqns)
    return ir.replace_scan(b, jaxpr=ir.closed(new_body, body.consts),
                           invars=keep_in + list(b.invars[nc:]), num_consts=len(keep_in),
                           linear=keep_lin + lin[nc:])


__all__ = ["Chunking", "plan_chunks", "chunk_pair", "apply_chunks", "sink_broadcasts"]
