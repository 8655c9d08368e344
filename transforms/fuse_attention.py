"""Fuse hand-written scaled dot-product attention into one attention kernel.

Matches ``softmax(masks and biases(scale·q·kᵀ))·v`` on dataflow, in any spelling:
:mod:`attention_match` names every axis of the scores after the q·kᵀ axis it comes
from and follows it through transposes, reshapes (merging axes, adding or dropping
size-1 ones), casts, scales, masks and biases, so any number of batch axes, heads first
or last or folded into batch, vmapped per-head code, GQA head groups (a free axis of q)
and ``jnp.repeat``-ed key/value heads are one case. Scale on the scores, q or k; boolean
masks (``jnp.where(mask, s, -big)``, either polarity; a constant lower-triangular one
becomes ``is_causal=True``), a constant additive 0/-big mask (a mask), other additive
terms (biases); softmax as ``jax.nn.softmax``, ``exp(s - max) / sum`` (with or without
``stop_gradient``, the max on any layout of s), ``exp(s) / sum(exp(s))``, multiplication
by the reciprocal, or ``exp(log_softmax(s))``, cast before the second dot or not.
Identity: all of these compute ``softmax(masks and biases(scale·q·kᵀ))·v`` row by row.

The kernel: on GPU, cuDNN's ``jax.nn.dot_product_attention`` where dtype and head size
allow and there is no extra mask or bias and the dots ask for no precision or output type
it cannot take (it has no such arguments); elsewhere :func:`attention_kernel`, XLA's
attention computation with the original dots' ``precision`` and output types, masks and
biases in their original order, scores and softmax in the program's dtype promoted to at
least float32 (float64 stays float64). Causal attention there, without an extra mask,
runs block-causal: query blocks attend only to the keys at or before their last row,
skipping the fully masked score blocks that XLA would compute and discard (with 4 blocks
it computes 5/8 of the score FLOPs; the GPT loss + gradient at T=256 on CPU:
1.01–1.03×, where ``dot_product_attention`` runs at 0.95×). Identity: a masked score
contributes exp(-big) = 0 to its row's softmax, so dropping it changes no sum.

Must not fire (each recognised candidate left alone gets one line in the notes): when
the scores or probabilities are read elsewhere (the saved softmax of a jaxpr that
already holds the backward pass: decorate the loss instead), when the "mask" fill is not
a large negative number (then it is not a mask), with ``-inf`` fill and a mask that may
empty a row (the original gives NaN there), when a scale follows a mask or bias, when an
operation the kernel cannot replay sits between q·kᵀ and the softmax (soft-capping), or
when the second dot does not contract the key axis and pair q·kᵀ's batch axes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from graphopt.patterns import DotRule, Match, View
from .attention_match import (FILL_MAX, NotAttention, Refused, layout_step, mask_terms, nonunit,
                              prod, replay, scores_chain, softmax_input, to_layout, unrepeat)
from .fuse_xent import POST_AD_HINT, note, refuse

def _dims(eqn, side):
    """(contracting, batch, free) dims of a dot_general's operand ``side``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    c, b = (lc, lb) if side == 0 else (rc, rb)
    nd = eqn.invars[side].aval.ndim
    free = [d for d in range(nd) if d not in c and d not in b]
    return list(c), list(b), free


BLOCK_MIN = 64   # smallest query block worth a separate pair of dots
MAX_BLOCKS = 4   # more blocks skip more, but small dots lose more to overhead (CPU)


def n_causal_blocks(T: int, S: int) -> int:
    """Query blocks for :func:`block_causal_attention` (0: run the plain kernel)."""
    n = min(MAX_BLOCKS, T // BLOCK_MIN, S // BLOCK_MIN)
    while n > 1 and T % n:
        n -= 1
    return n if n > 1 else 0


def attention_kernel(q, k, v, *, scale, terms=(), causal=False, n_blocks=1,
                     precision=(None, None), acc=None, p_dtype=None, out_type=None):
    """``softmax(terms(scale·q·kᵀ), causal)·v`` for q [B,T,N,H], k/v [B,S,N/G,H]: ``terms``
    are ("bias", b) and ("mask", keep, fill), b/keep [B|1,N|1,T,S], applied in order.
    Scores and softmax in ``acc`` (default: q's dtype, at least float32), probabilities in
    ``p_dtype`` (default v's), the two dots with ``precision`` and ``out_type`` (the p·v
    dot's preferred_element_type). Causal with ``n_blocks`` > 1: query block i is scored
    against keys [0, (i+1)·T/n) only, the blocks above the diagonal are never computed."""
    T, S = q.shape[1], k.shape[1]
    if k.shape[2] != q.shape[2]:  # grouped-query: query head n reads key/value head n // G
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    if n_blocks < 1 or T % n_blocks or (n_blocks > 1 and not causal):
        raise ValueError(f"attention_kernel: n_blocks={n_blocks} must divide the query "
                         f"length {T} (and needs causal=True when > 1)")
    acc = jnp.promote_types(q.dtype, jnp.float32) if acc is None else acc  # as XLA's attention
    p_dtype = v.dtype if p_dtype is None else p_dtype
    bs, outs = T // n_blocks, []
    for i in range(n_blocks):
        rows, hi = slice(i * bs, (i + 1) * bs), (min((i + 1) * bs, S) if n_blocks > 1 else S)
        s = lax.dot_general(q[:, rows], k[:, :hi], (((3,), (3,)), ((0, 2), (0, 2))),
                            precision=precision[0], preferred_element_type=acc) * scale
        for kind, x, *fill in terms:
            x = x[:, :, rows, :hi]
            s = s + x.astype(acc) if kind == "bias" else jnp.where(x, s, jnp.asarray(fill[0], acc))
        if causal:
            keep = (lax.broadcasted_iota(jnp.int32, (bs, hi), 1)
                    <= lax.broadcasted_iota(jnp.int32, (bs, hi), 0) + i * bs)
            s = jnp.where(keep, s, jnp.finfo(acc).min)
        p = jax.nn.softmax(s, axis=-1).astype(p_dtype)
        o = lax.dot_general(p, v[:, :hi], (((3,), (1,)), ((0, 1), (0, 2))),
                            precision=precision[1], preferred_element_type=out_type)
        outs.append(jnp.transpose(o, (0, 2, 1, 3)))
    return jnp.concatenate(outs, axis=1)


def block_causal_attention(q, k, v, *, scale, n_blocks, bias=None):
    """``dot_product_attention(..., is_causal=True)`` (query t sees keys <= t; q [B,T,N,H],
    k/v [B,S,N,H], bias [B|1,N|1,T,S]) with the numerics of its XLA implementation
    (scores and softmax in at least float32), query block i against keys [0, (i+1)*T/n) only.
    No extra mask: a row it emptied would spread over all S keys there, here over fewer."""
    return attention_kernel(q, k, v, scale=scale, causal=True, n_blocks=n_blocks,
                            terms=() if bias is None else (("bias", bias),))


def _default_precision(p) -> bool:
    return p is None or (isinstance(p, tuple) and all(x in (None, lax.Precision.DEFAULT) for x in p))


def _swap(p, swap: bool):
    """A dot's precision for its operands in the other order."""
    return (p[1], p[0]) if swap and isinstance(p, tuple) else p


def _scaled(view: View, x, eqns: set):
    """``x`` = c·y or y/c for a scalar c, read once: (y, c); else (x, 1.0)."""
    e = view.producer_eqn(x)
    if e is not None and e.primitive.name in ("mul", "div") and view.n_uses(x) == 1:
        for k in ((0, 1) if e.primitive.name == "mul" else (1,)):
            c = view.scalar_value(e.invars[k])
            if c is not None and c != 0 and e.invars[1 - k].aval.shape == x.aval.shape:
                eqns.add(view.producer[x])
                return e.invars[1 - k], (c if e.primitive.name == "mul" else 1.0 / c)
    return x, 1.0


class AttentionRule(DotRule):
    """The root is the probabilities·v dot (``p_side``: the probabilities' operand).
    ``only_where_it_pays``: off GPU, fire only where the block-causal kernel applies
    (elsewhere XLA's attention is the very computation the hand-written one is)."""

    def __init__(self, only_where_it_pays: bool = False):
        super().__init__("fuse.attention")
        self.only_where_it_pays = only_where_it_pays

    def _find(self, view, i, root, p_side):
        local, post, atom = set(), [], root.invars[p_side]
        # Between the softmax and the probabilities·v dot: casts and layout changes only.
        while (sm := softmax_input(view, atom, local)) is None:
            e = view.producer_eqn(atom)
            step = layout_step(view, view.producer[atom]) if e is not None else None
            if step is None or view.n_uses(atom) != 1:
                return None
            post.insert(0, step)
            local.add(view.producer[atom])
            atom = e.invars[0]
        try:
            chain = scores_chain(view, sm[0], local)
            return self._build(view, i, root, p_side, sm, chain, post, local | {i})
        except NotAttention:
            return None
        except Refused as why:  # recognised, left as written: one line in the report
            return refuse(view, i, self.name, str(why))

    def _build(self, view, i, root, p_side, sm, chain, post, eqns):
        a = _label_scores(view, root, p_side, sm, chain, post)
        _label_operands(root, p_side, a)
        _regroup_heads(view, a)
        _choose_kernel(view, i, self.name, root, p_side, a, eqns)
        if self.only_where_it_pays and a.platform != "gpu" and not a.nblk:
            d = view.stats.details  # counted for the pass's note (fuse.py), then dropped
            d[NOT_PAYING] = d.get(NOT_PAYING, 0) + 1
            return None
        out_var = _absorb_layout_after(view, root, a, eqns)
        args = [a.q, a.k, a.v] + [t[1] for t in a.kterms]
        post = POST_AD_HINT if getattr(view.ctx, "placement", "") == "post-AD" else ""
        rule = self.name + (".causal" if a.causal else "") + (".cudnn" if a.impl == "cudnn" else "")
        return Match(rule, frozenset(eqns), [out_var], _fused_fn(a, out_var.aval), args, note=post)


class _Attn:
    """What ``AttentionRule._build`` learns about one candidate, phase by phase: the axis
    labels and sizes, the operands, masks and biases, and the kernel it chose."""


def _nz(sizes, atoms):
    return [x for x in atoms if sizes[x] > 1]


def _label_scores(view, root, p_side, sm, chain, post) -> _Attn:
    """Label the scores' axes by atom and replay the chain on the labels: which operand
    of q·kᵀ is the keys, the scale, the masks and biases in program order."""
    a = _Attn()
    a.s, ax = sm
    a.p, a.v = root.invars[p_side], root.invars[1 - p_side]
    d1 = a.d1 = view.eqns[chain.dot]
    dims = a.dims = (_dims(d1, 0), _dims(d1, 1))
    if len(dims[0][0]) != 1:
        raise Refused("q·kᵀ contracts more than one axis")
    a.nb = len(dims[0][1])
    labels = [(("b", j),) for j in range(a.nb)] + [((side, d),) for side in (0, 1)
                                                    for d in dims[side][2]]
    sizes = {lab[0]: n for lab, n in zip(labels, d1.outvars[0].aval.shape)}
    scale, terms = 1.0, []
    for kind, idx, data in chain.steps:
        labels = replay(labels, (kind, idx, data), sizes)
        if kind == "scale":
            scale *= data
        elif kind in ("mask", "bias"):
            terms.append((kind, data, list(labels), view.eqns[idx].outvars[0].aval.shape))
    key_ax = nonunit([labels[ax]], sizes)
    if len(key_ax) != 1 or key_ax[0][0] not in (0, 1):
        raise Refused("the softmax does not run over the key axis of q·kᵀ alone")
    k_side, s_dim = key_ax[0]
    q_side = 1 - k_side
    if [d for d in dims[k_side][2] if sizes[(k_side, d)] > 1] != [s_dim]:
        raise Refused("the keys have more than one free axis")
    q_free = dims[q_side][2]
    t_dim = max(q_free, key=lambda d: sizes[(q_side, d)]) if q_free else None
    ren = {(k_side, d): ("s" if d == s_dim else ("x", d)) for d in dims[k_side][2]}
    ren.update({(q_side, d): ("t" if d == t_dim else ("g", d)) for d in q_free})
    sizes = {ren.get(x, x): n for x, n in sizes.items()}
    sizes.setdefault("t", 1)

    def rn(labs):
        return [tuple(ren.get(x, x) for x in ax) for ax in labs]
    labels = rn(labels)
    for step in post:  # the probabilities' layout as the second dot reads them
        labels = replay(labels, step, sizes)
    a.terms = [(kind, data, rn(lab), shp) for kind, data, lab, shp in terms]
    a.labels, a.sizes, a.scale, a.ren = labels, sizes, scale, ren
    a.q_side, a.k_side, a.q_free, a.t_dim = q_side, k_side, q_free, t_dim
    a.q, a.k = d1.invars[q_side], d1.invars[k_side]
    return a


def _label_operands(root, p_side, a: _Attn) -> None:
    """Label q, k and v's axes; check the probabilities·v dot contracts the key axis and
    pairs the batch atoms of q·kᵀ."""
    labels, sizes, dims, ren = a.labels, a.sizes, a.dims, a.ren

    def operand_labels(side):
        c, b, f = dims[side]
        lab = [None] * a.d1.invars[side].aval.ndim
        lab[c[0]] = ("h",)
        for j, d in enumerate(b):
            lab[d] = (("b", j),)
        for d in f:
            lab[d] = (ren[(side, d)],)
        return lab
    a.q_lab, a.k_lab = operand_labels(a.q_side), operand_labels(a.k_side)
    sizes["h"] = a.q.aval.shape[dims[a.q_side][0][0]]
    (pc, pb, pf), (vc, vb, vf) = _dims(root, p_side), _dims(root, 1 - p_side)
    if len(pc) != 1 or nonunit([labels[pc[0]]], sizes) != ["s"]:
        raise Refused("the probabilities·v dot does not contract the key axis alone")
    a.bs = [("b", j) for j in range(a.nb) if sizes[("b", j)] > 1]
    a.gs = [ren[(a.q_side, d)] for d in a.q_free
            if d != a.t_dim and sizes[ren[(a.q_side, d)]] > 1]
    p_batch = nonunit([labels[d] for d in pb], sizes)
    if sorted(p_batch) != sorted(a.bs) or any(len(nonunit([labels[d]], sizes)) > 1 for d in pb):
        raise Refused("the probabilities·v dot pairs batch axes other than q·kᵀ's")
    if sorted(nonunit([labels[d] for d in pf], sizes), key=str) != sorted(
            nonunit([("t",)], sizes) + a.gs, key=str):
        raise Refused("the probabilities·v dot keeps axes other than the queries'")
    v = a.v
    hv = [d for d in vf if v.aval.shape[d] > 1]
    if len(hv) != 1:
        raise Refused(f"the values have {len(hv)} feature axes (one expected)")
    sizes["hv"] = v.aval.shape[hv[0]]
    v_lab = [None] * v.aval.ndim
    v_lab[vc[0]] = ("s",)
    for j, d in enumerate(vb):
        v_lab[d] = labels[pb[j]]
    for d in vf:
        v_lab[d] = ("hv",) if d == hv[0] else ()
    a.v_lab = v_lab
    a.out_labels = [labels[d] for d in pb] + (
        [labels[d] for d in pf] + [v_lab[d] for d in vf] if p_side == 0
        else [v_lab[d] for d in vf] + [labels[d] for d in pf])


def _regroup_heads(view, a: _Attn) -> None:
    """Batch atoms as [B, N]; GQA spelt with ``jnp.repeat`` of the key/value heads passes
    them unrepeated; the kernel's sizes B, T, S, N, Nk, H."""
    sizes, bs = a.sizes, a.bs
    kv_atom = None
    a.lead = bs[:1] if len(bs) >= 2 else []   # canonical B: the first batch atom, N: the rest
    a.heads = bs[len(a.lead):]
    if a.heads and not [d for d in a.q_free if d != a.t_dim
                        and sizes[a.ren[(a.q_side, d)]] > 1]:
        rk, rv = (unrepeat(view, x, lab, bs[-1]) for x, lab in ((a.k, a.k_lab), (a.v, a.v_lab)))
        if rk and rv and rk[1] == rv[1] and rk[0].aval.dtype == rv[0].aval.dtype:
            kv_atom = ("kv",)
            sizes[kv_atom] = sizes[bs[-1]] // rk[1]
            a.k, a.v = rk[0], rv[0]
            a.k_lab, a.v_lab = ([(kv_atom,) if ax == (bs[-1],) else ax for ax in lab]
                                for lab in (a.k_lab, a.v_lab))
    q, k, v = a.q, a.k, a.v
    if q.aval.dtype != k.aval.dtype or q.aval.dtype != v.aval.dtype:
        raise Refused(f"q, k, v dtypes differ ({q.aval.dtype}, {k.aval.dtype}, {v.aval.dtype})")
    a.B, a.T, a.S = prod(sizes, a.lead), sizes["t"], sizes["s"]
    a.kv_heads = a.heads[:-1] + [kv_atom] if kv_atom else a.heads
    a.N, a.Nk, a.H = prod(sizes, a.heads + a.gs), prod(sizes, a.kv_heads), sizes["h"]
    a.t_want = _nz(sizes, bs + a.gs + ["t", "s"])  # masks and biases: [B, N, T, S]


def _choose_kernel(view, i, name, root, p_side, a: _Attn, eqns) -> None:
    """Masks, causality, the scale and both dots' precision and types; then the kernel:
    cuDNN, XLA's ``dot_product_attention`` or graphopt's (block-causal where it pays)."""
    # Masks and biases in program order; a constant lower-triangular mask is causality.
    kterms, causal_at = mask_terms(view, a.terms, a.sizes, a.t_want, (a.B, a.N, a.T, a.S))
    # The causal mask becomes is_causal only alone: with another mask, a row both empty
    # takes its weights from their fills, which the kernel then replays as written.
    kinds = [t[0] for t in kterms]
    a.causal = causal_at is not None and kinds.count("mask") == 1
    if a.causal:
        del kterms[causal_at]
        kinds = [t[0] for t in kterms]
    a.kterms, a.kinds = kterms, kinds
    a.q, cq = _scaled(view, a.q, eqns)   # a scalar scale on q or k before the dot joins
    a.k, ck = _scaled(view, a.k, eqns)
    a.scale *= cq * ck
    q, d1 = a.q, a.d1
    # The kernel keeps both dots' precision and output types, and the dtypes between.
    a.prec = prec = (_swap(d1.params.get("precision"), a.q_side == 1),
                     _swap(root.params.get("precision"), p_side == 1))
    a.out_type = root.params.get("preferred_element_type")
    a.sdt = functools.reduce(jnp.promote_types, (q.aval.dtype, d1.outvars[0].aval.dtype,
                                                 a.s.aval.dtype, jnp.float32))  # scores, softmax
    a.pdt = a.p.aval.dtype
    a.platform = getattr(view.ctx, "platform", "cpu") if view.ctx is not None else "cpu"
    # dot_product_attention has no precision or output-type arguments: it is used only
    # where it computes what the program asks; graphopt's kernel everywhere else.
    as_is = (all(_default_precision(x) for x in prec) and a.pdt == a.v.aval.dtype
             and a.out_type in (None, a.v.aval.dtype)
             and d1.params.get("preferred_element_type") in (None, q.aval.dtype, jnp.float32))
    one_fill = len({t[4][1] for t in kterms if t[0] == "mask"}) <= 1  # its masks share one fill
    # JAX's own XLA attention asks float16 for the F16_F16_F32 dot algorithm, which XLA CPU
    # rejects at compile time (seed 4242 program 678): graphopt's kernel there
    f16_on_cpu = a.platform == "cpu" and q.aval.dtype == jnp.float16
    dpa = as_is and a.sdt == jnp.float32 and kinds == sorted(kinds) and one_fill \
        and not f16_on_cpu
    impl = "xla" if dpa else "kernel"
    if (a.platform == "gpu" and q.aval.dtype in (jnp.bfloat16, jnp.float16) and a.H % 8 == 0
            and a.H <= 128 and not kterms):
        if as_is:
            impl = "cudnn"
        else:
            note(view, i, name, f"cuDNN not used: the attention dots ask for precision "
                 f"{prec} or output types it cannot take; fused into graphopt's XLA kernel")
    a.nblk = n_causal_blocks(a.T, a.S) if a.causal and impl != "cudnn" and "mask" not in kinds else 0
    a.impl = "kernel" if a.nblk else impl


def _absorb_layout_after(view, root, a: _Attn, eqns):
    """Layout changes right after (heads back in place) join the match: no round trip.
    Returns the value the match now defines."""
    out_var = root.outvars[0]
    while view.n_uses(out_var) == 1 and out_var not in view.outputs:
        (u,) = view.users[out_var]
        step = layout_step(view, u)
        if step is None or step[0] == "cast":
            break
        try:
            a.out_labels = replay(a.out_labels, step, a.sizes)
        except Refused:
            break
        eqns.add(u)
        out_var = view.eqns[u].outvars[0]
    return out_var


def _fused_fn(a: _Attn, out_aval):
    """The replacement: q, k, v (and the masks' and biases' operands) to the kernel's
    [B, T, N, H] layout, the kernel, its result back to the program's layout."""
    sizes, lead, heads, gs, kv_heads = a.sizes, a.lead, a.heads, a.gs, a.kv_heads
    B, T, S, N, Nk, H = a.B, a.T, a.S, a.N, a.Nk, a.H
    q_lab, k_lab, v_lab, t_want, kinds = a.q_lab, a.k_lab, a.v_lab, a.t_want, a.kinds
    scale, causal, impl, nblk, prec = a.scale, a.causal, a.impl, a.nblk, a.prec
    sdt, pdt, out_type, out_labels = a.sdt, a.pdt, a.out_type, a.out_labels
    meta = [(kind, lab, bd, mk) for kind, _, lab, bd, mk in a.kterms]

    def fused(q, k, v, *extra):
        qq = to_layout(jnp, q, q_lab, sizes, _nz(sizes, lead + ["t"] + heads + gs + ["h"]),
                       (B, T, N, H))
        kk = to_layout(jnp, k, k_lab, sizes, _nz(sizes, lead + ["s"] + kv_heads + ["h"]),
                       (B, S, Nk, H))
        vv = to_layout(jnp, v, v_lab, sizes, _nz(sizes, lead + ["s"] + kv_heads + ["hv"]),
                       (B, S, Nk, sizes["hv"]))
        ts = []
        for x, (kind, lab, bd, mk) in zip(extra, meta):
            x = jnp.broadcast_to(lax.broadcast_in_dim(x, mk[3], bd), mk[2])  # add/select
            if kind == "bias":                                           # may broadcast too
                ts.append(("bias", to_layout(jnp, x, lab, sizes, t_want, (B, N, T, S))))
                continue
            full = (x == 0) if mk[4] else x   # an additive 0 / -big mask: kept where 0
            full = full if mk[0] else ~full
            ts.append(("mask", to_layout(jnp, full, lab, sizes, t_want, (B, N, T, S)), mk[1]))
        if impl != "kernel":  # biases before masks here (kinds sorted): as the program
            bias = sum(t[1] for t in ts if t[0] == "bias") if "bias" in kinds else None
            mask = functools.reduce(jnp.logical_and, [t[1] for t in ts if t[0] == "mask"]) \
                if "mask" in kinds else None
            o = jax.nn.dot_product_attention(qq, kk, vv, bias=bias, mask=mask, scale=scale,
                                             is_causal=causal, implementation=impl)
        else:
            o = attention_kernel(qq, kk, vv, scale=scale, terms=ts, causal=causal,
                                 n_blocks=nblk or 1, precision=prec, acc=sdt, p_dtype=pdt,
                                 out_type=out_type)
        o_lab = [tuple(lead), ("t",), tuple(heads + gs), ("hv",)]
        return to_layout(jnp, o, o_lab, sizes, nonunit(out_labels, sizes),
                         out_aval.shape).astype(out_aval.dtype)

    return fused

NOT_PAYING = "attention left as written where it does not pay"
RULES = [AttentionRule()]
RULES_WHERE_IT_PAYS = [AttentionRule(only_where_it_pays=True)]

__all__ = ["AttentionRule", "RULES", "RULES_WHERE_IT_PAYS", "softmax_input", "POST_AD_HINT", "FILL_MAX",
           "attention_kernel", "block_causal_attention", "n_causal_blocks"]
