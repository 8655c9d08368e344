"""Fuse hand-written scaled dot-product attention into one attention kernel.

Matches ``softmax(mask(scale * q·kᵀ)) · v`` on dataflow: the two ``dot_general``s in any
layout whose batch dims pair up (heads first or last, heads folded into batch, no head
axis), a scalar scale on the scores or on q, boolean masks (``jnp.where(mask, s,
-big)``, either polarity; a constant lower-triangular one becomes ``is_causal=True``),
additive masks/biases, and softmax written as ``jax.nn.softmax``, ``exp(s - max) / sum``
(with or without ``stop_gradient``), ``exp(s) / sum(exp(s))``, multiplication by the
reciprocal, or ``exp(log_softmax(s))``. Identity: all of these compute
``softmax(masks and biases(scale·q·kᵀ)) · v`` row by row.

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

Must not fire: when the scores or probabilities are read elsewhere (the saved softmax
of a jaxpr that already holds the backward pass: decorate the loss instead, the report
says so), when the "mask" fill is not a large negative number (then it is not a mask),
with ``-inf`` fill and a mask that may empty a row (the original gives NaN there; said
in the notes), when a scale follows the mask, or with more than two batch dims.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.patterns import DotRule, Match, View
from .fuse_xent import POST_AD_HINT, _centered, _prod, _reduce, log_softmax_input, note, refuse

FILL_MAX = -1e9  # a where-fill at or below this is a mask (exp underflows to exactly 0)


def _softmax_call_input(view: View, p, eqns: set):
    """``p`` = a ``custom_jvp_call`` whose body is a softmax (``jax.nn.softmax`` from
    JAX 0.12 on, or with ``jax_softmax_custom_jvp``): (s, axis) or None."""
    e = _prod(view, p, "custom_jvp_call")
    if e is None or len(e.invars) != 1 or len(e.outvars) != 1:
        return None
    inner = View(ir.as_closed(e.params["call_jaxpr"]))
    got = softmax_input(inner, inner.jaxpr.outvars[0], set())
    if got is None or got[0] is not inner.jaxpr.invars[0]:
        return None
    eqns.add(view.producer[p])
    return e.invars[0], got[1]


def softmax_input(view: View, p, eqns: set):
    """If ``p`` is a softmax of s along one axis: (s, axis); equations go into ``eqns``."""
    called = _softmax_call_input(view, p, eqns)
    if called is not None:
        return called
    e = _prod(view, p, "div", "mul", "exp")
    if e is None:
        return None
    local = {view.producer[p]}
    if e.primitive.name == "exp":  # exp(log_softmax(s))
        got = log_softmax_input(view, e.invars[0], local)
        if got is None:
            return None
        eqns |= local
        return got
    num, den = e.invars
    if e.primitive.name == "mul":
        for a, b in ((num, den), (den, num)):
            r = _prod(view, b, "div", "integer_pow")
            if r is None:
                continue
            if r.primitive.name == "div" and view.scalar_value(r.invars[0]) == 1.0:
                num, den = a, r.invars[1]
            elif r.primitive.name == "integer_pow" and r.params["y"] == -1:
                num, den = a, r.invars[0]
            else:
                continue
            local.add(view.producer[b])
            break
        else:
            return None
    ex = _prod(view, num, "exp")
    if ex is None:
        return None
    local.add(view.producer[num])
    red = _reduce(view, den, "reduce_sum", local)
    if red is None or red[0] is not num:
        return None
    s, ax = _centered(view, ex.invars[0], local)
    if ax is not None and ax != red[1]:
        return None
    eqns |= local
    return s, red[1]


@dataclasses.dataclass
class _Scores:
    dot: int                     # index of q·kᵀ
    scale: float = 1.0
    # ("mask", pred atom, keep_if_true, fill) / ("bias", atom), the last applied first.
    terms: list = dataclasses.field(default_factory=list)


def _scores(view: View, s, eqns: set, acc: _Scores | None = None, seen_scale=False):
    """Walk back from the softmax input to q·kᵀ through masks, biases and scales."""
    acc = acc or _Scores(-1)
    e = view.producer_eqn(s)
    if e is None:
        return None
    i = view.producer[s]
    name = e.primitive.name
    if name == "dot_general":
        acc.dot = i
        eqns.add(i)
        return acc
    if name == "convert_element_type":
        eqns.add(i)
        return _scores(view, e.invars[0], eqns, acc, seen_scale)
    if name in ("mul", "div"):
        for k in ((0, 1) if name == "mul" else (1,)):
            c = view.scalar_value(e.invars[k])
            other = e.invars[1 - k]
            if c is None or c == 0 or tuple(other.aval.shape) != tuple(s.aval.shape):
                continue
            acc.scale *= (c if name == "mul" else 1.0 / c)
            eqns.add(i)
            return _scores(view, other, eqns, acc, True)
        return None
    if seen_scale:
        return None  # a scale after the mask would scale the mask too
    if name == "select_n" and len(e.invars) == 3:
        pred, a, b = e.invars
        for keep_true, fill, x in ((True, a, b), (False, b, a)):
            fv = view.scalar_value(fill)
            if (fv is not None and fv <= FILL_MAX and tuple(x.aval.shape) == tuple(s.aval.shape)
                    and pred.aval.dtype == np.bool_):
                acc.terms.append(("mask", pred, keep_true, fv))
                eqns.add(i)
                return _scores(view, x, eqns, acc, seen_scale)
        return None
    if name == "add":
        for k in (0, 1):
            x, bias = e.invars[k], e.invars[1 - k]
            if tuple(x.aval.shape) != tuple(s.aval.shape):
                continue
            sub = set()
            got = _scores(view, x, sub, dataclasses.replace(acc, terms=acc.terms + [("bias", bias)]),
                          seen_scale)
            if got is not None:
                eqns |= sub | {i}
                return got
    return None


def _dims(eqn, side):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    c, b = (lc, lb) if side == 0 else (rc, rb)
    nd = eqn.invars[side].aval.ndim
    free = [d for d in range(nd) if d not in c and d not in b]
    return list(c), list(b), free


def _canon(x, b_dims, t, h):
    """x → [B, T, N, H] from its batch dims (≤2), sequence dim ``t`` and feature dim ``h``."""
    perm = list(b_dims[:1]) + [t] + list(b_dims[1:2]) + [h]
    x = jnp.transpose(x, perm)
    if len(b_dims) == 0:
        x = x[None]
    if len(b_dims) < 2:
        x = x[:, :, None]
    return x


def _to_canon4(x, s_rank, batch_pos, t_pos, s_pos):
    """A mask/bias laid out like the scores (rank ``s_rank`` or scalar) → [B, N, T, S]."""
    x = jnp.reshape(x, (1,) * s_rank) if x.ndim == 0 else x
    perm = list(batch_pos) + [t_pos, s_pos]
    x = jnp.transpose(x, perm)
    if len(batch_pos) == 1:
        x = x[:, None]
    elif not batch_pos:
        x = x[None, None]
    return x


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
    """``softmax(terms(scale·q·kᵀ), causal)·v`` for q [B,T,N,H], k/v [B,S,N,H]: ``terms``
    are ("bias", b) and ("mask", keep, fill), b/keep [B|1,N|1,T,S], applied in order.
    Scores and softmax in ``acc`` (default: q's dtype, at least float32), probabilities in
    ``p_dtype`` (default v's), the two dots with ``precision`` and ``out_type`` (the p·v
    dot's preferred_element_type). Causal with ``n_blocks`` > 1: query block i is scored
    against keys [0, (i+1)·T/n) only, the blocks above the diagonal are never computed."""
    T, S = q.shape[1], k.shape[1]
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


class AttentionRule(DotRule):
    """The root is the probabilities·v dot (``p_side``: the probabilities' operand).
    ``only_where_it_pays``: off GPU, fire only where the block-causal kernel applies
    (elsewhere XLA's attention is the very computation the hand-written one is)."""

    def __init__(self, only_where_it_pays: bool = False):
        super().__init__("fuse.attention")
        self.only_where_it_pays = only_where_it_pays

    def _find(self, view, i, root, p_side):
        p = root.invars[p_side]
        v = root.invars[1 - p_side]
        eqns = {i}
        sm = softmax_input(view, p, eqns)
        if sm is None:
            return None
        s, ax = sm
        acc = _scores(view, s, eqns)
        if acc is None:
            return None
        d1 = view.eqns[acc.dot]
        if len(d1.outvars[0].aval.shape) != len(p.aval.shape):
            return None
        (c0, b0, f0), (c1, b1, f1) = _dims(d1, 0), _dims(d1, 1)
        nb = len(b0)
        if len(c0) != 1 or len(f0) != 1 or len(f1) != 1 or nb > 2:
            return None
        # Scores dims: batch..., lhs free, rhs free. The softmax axis is the key axis.
        if ax == nb + 1:
            q_side, t_pos, s_pos = 0, nb, nb + 1
        elif ax == nb:
            q_side, t_pos, s_pos = 1, nb + 1, nb
        else:
            return None
        qc, qb, qf = (c0, b0, f0) if q_side == 0 else (c1, b1, f1)
        kc, kb, kf = (c1, b1, f1) if q_side == 0 else (c0, b0, f0)
        q, k = d1.invars[q_side], d1.invars[1 - q_side]
        # Second dot: p's key axis contracts with v's sequence axis; batch dims pair up.
        pc, pb, pf = _dims(root, p_side)
        vc, vb, vf = _dims(root, 1 - p_side)
        if pc != [s_pos] or sorted(pb) != list(range(nb)) or pf != [t_pos] or len(vf) != 1:
            return None
        v_batch = [vb[pb.index(j)] for j in range(nb)]
        if q.aval.dtype != k.aval.dtype or q.aval.dtype != v.aval.dtype:
            return None
        # Output dims of the root, named by canonical [B, T, N, H] axes.
        names = {0: 0, 1: 2}
        out_names = [names[pb[j]] for j in range(nb)]
        out_names += [1, 3] if p_side == 0 else [3, 1]
        H = q.aval.shape[qc[0]]
        T, S = s.aval.shape[t_pos], s.aval.shape[s_pos]
        causal_at, terms = None, []   # terms: masks and biases in program order
        for kind, pred, *rest in reversed(acc.terms):
            if kind == "bias":
                terms.append(("bias", pred, None, None))
                continue
            keep_true, fill = rest
            src, bdims = pred, tuple(range(len(s.aval.shape)))
            e = view.producer_eqn(pred)
            if e is not None and e.primitive.name == "broadcast_in_dim" \
                    and list(e.params["broadcast_dimensions"]) == sorted(e.params["broadcast_dimensions"]):
                src, bdims = e.invars[0], tuple(e.params["broadcast_dimensions"])
            val = view.constant_value(src)
            if val is not None:
                full = np.reshape(val, [src.aval.shape[bdims.index(d)] if d in bdims else 1
                                        for d in range(len(s.aval.shape))])
                full = np.broadcast_to(full, s.aval.shape) if full.size <= (1 << 22) else None
                if full is not None:
                    keep = full if keep_true else ~full
                    if fill == -np.inf and not keep.any(axis=s_pos).all():
                        return refuse(view, i, self.name, "a -inf mask fill empties a row "
                                      "(NaN in the original)")
                    m2 = np.moveaxis(keep, (t_pos, s_pos), (-2, -1)).reshape(-1, T, S)
                    if causal_at is None and (m2 == np.tril(np.ones((T, S), bool))).all():
                        causal_at = len(terms)
            elif fill == -np.inf:
                return refuse(view, i, self.name, "a -inf mask fill may empty a row (NaN in "
                              "the original)")
            terms.append(("mask", src, bdims, (keep_true, fill)))
        # The causal mask becomes is_causal only alone: with another mask, a row both empty
        # takes its weights from their fills, which the kernel then replays as written.
        causal = causal_at is not None and [t[0] for t in terms].count("mask") == 1
        if causal:
            del terms[causal_at]
        q_eqns = set()
        scale = acc.scale
        # A scalar scale applied to q before the dot joins the scale.
        qe = view.producer_eqn(q)
        if qe is not None and qe.primitive.name in ("mul", "div") and view.n_uses(q) == 1:
            for kk in ((0, 1) if qe.primitive.name == "mul" else (1,)):
                c = view.scalar_value(qe.invars[kk])
                if c is not None and tuple(qe.invars[1 - kk].aval.shape) == tuple(q.aval.shape):
                    scale *= c if qe.primitive.name == "mul" else 1.0 / c
                    q = qe.invars[1 - kk]
                    q_eqns.add(view.producer[d1.invars[q_side]])
                    break
        eqns |= q_eqns
        s_rank = len(s.aval.shape)
        # The kernel keeps both dots' precision and output types, and the dtypes between.
        prec = (_swap(d1.params.get("precision"), q_side == 1),
                _swap(root.params.get("precision"), p_side == 1))
        out_type = root.params.get("preferred_element_type")
        sdt = functools.reduce(jnp.promote_types, (q.aval.dtype, d1.outvars[0].aval.dtype,
                                                   s.aval.dtype, jnp.float32))  # scores, softmax
        pdt = p.aval.dtype
        platform = getattr(view.ctx, "platform", "cpu") if view.ctx is not None else "cpu"
        # dot_product_attention has no precision or output-type arguments: it is used only
        # where it computes what the program asks; graphopt's kernel everywhere else.
        as_is = (all(_default_precision(x) for x in prec) and pdt == v.aval.dtype
                 and out_type in (None, v.aval.dtype)
                 and d1.params.get("preferred_element_type") in (None, q.aval.dtype, jnp.float32))
        kinds = [t[0] for t in terms]
        one_fill = len({t[3][1] for t in terms if t[0] == "mask"}) <= 1  # its masks share one fill
        dpa = as_is and sdt == jnp.float32 and kinds == sorted(kinds) and one_fill
        impl = "xla" if dpa else "kernel"
        if (platform == "gpu" and q.aval.dtype in (jnp.bfloat16, jnp.float16) and H % 8 == 0
                and H <= 128 and not terms):
            if as_is:
                impl = "cudnn"
            else:
                note(view, i, self.name, f"cuDNN not used: the attention dots ask for precision "
                     f"{prec} or output types it cannot take; fused into graphopt's XLA kernel")
        nblk = n_causal_blocks(T, S) if causal and impl != "cudnn" and "mask" not in kinds else 0
        impl = "kernel" if nblk else impl
        if self.only_where_it_pays and platform != "gpu" and not nblk:
            return None
        out_var = root.outvars[0]
        # A transpose right after (heads back in place) joins the match: no round trip.
        if view.n_uses(out_var) == 1 and out_var not in view.outputs:
            (u,) = view.users[out_var]
            ue = view.eqns[u]
            if ue.primitive.name == "transpose":
                perm_t = ue.params["permutation"]
                out_names = [out_names[d] for d in perm_t]
                eqns.add(u)
                out_var = ue.outvars[0]
        out_aval = out_var.aval
        meta = [(kind, bd, mk) for kind, _, bd, mk in terms]
        batch_pos = list(range(nb))

        def fused(q, k, v, *extra):
            qq = _canon(q, qb, qf[0], qc[0])
            kk = _canon(k, kb, kf[0], kc[0])
            vv = _canon(v, v_batch, vc[0], vf[0])
            ts = []
            for x, (kind, bd, mk) in zip(extra, meta):
                if kind == "bias":
                    ts.append(("bias", _to_canon4(jnp.broadcast_to(x, s.aval.shape), s_rank,
                                                  batch_pos, t_pos, s_pos)))
                    continue
                full = lax.broadcast_in_dim(x, s.aval.shape, bd)
                full = full if mk[0] else ~full
                ts.append(("mask", _to_canon4(full, s_rank, batch_pos, t_pos, s_pos), mk[1]))
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
            # o: [B, T, N, H]; drop the axes we added, then lay out like the original.
            keep_axes = ([0] if nb >= 1 else []) + [1] + ([2] if nb >= 2 else []) + [3]
            o = jnp.reshape(o, [o.shape[a] for a in keep_axes])
            perm = [keep_axes.index(nm) for nm in out_names]
            if perm != sorted(perm):
                o = jnp.transpose(o, perm)
            return o.astype(out_aval.dtype)

        args = [q, k, v] + [t[1] for t in terms]
        post = POST_AD_HINT if getattr(view.ctx, "placement", "") == "post-AD" else ""
        rule = self.name + (".causal" if causal else "") + (".cudnn" if impl == "cudnn" else "")
        return Match(rule, frozenset(eqns), [out_var], fused, args, note=post)


RULES = [AttentionRule()]
RULES_WHERE_IT_PAYS = [AttentionRule(only_where_it_pays=True)]

__all__ = ["AttentionRule", "RULES", "RULES_WHERE_IT_PAYS", "softmax_input", "POST_AD_HINT",
           "attention_kernel", "block_causal_attention", "n_causal_blocks"]
