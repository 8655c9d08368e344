"""Fuse the output projection with softmax cross-entropy, computed in vocabulary chunks.

Matches ``take_along_axis(log_softmax(h @ W), labels)`` (``W`` as [d, V] or [V, d], an
optional cast of the logits, ``log_softmax`` stabilized or not) and replaces it with
:func:`chunked_logprob`: a scan over vocabulary chunks keeps a running log-sum-exp and
the label's logit, so the full [tokens, V] logits never exist, forward or backward.
Identity: ``log_softmax(z)[y] = z[y] - logsumexp(z)`` and logsumexp combines over chunks
(``lse(a ∪ b) = m + log(e^{lse(a)-m} + e^{lse(b)-m})``); the derivative w.r.t. the
logits is ``onehot(y) - softmax(z)``, chunk by chunk.

Differentiation: a ``custom_jvp`` whose tangent rule is a second scan over the chunks,
linear in the tangents, with the chunk's softmax recomputed under ``jax.checkpoint``.
Forward mode (``jax.jvp``, ``jax.jacfwd``) runs it as is; reverse mode transposes it,
so the backward scan recomputes each chunk's softmax and nothing [tokens, V] is saved.

Numerics: each chunk's logits come from the original dot (its ``precision`` and
``preferred_element_type``); log-sum-exp, softmax and accumulations run in the
program's dtype promoted to at least float32 (float64 stays float64).
Out-of-range labels give what the gather gives in its mode (``fill``: the fill value,
``clip``: the clamped label, ``promise_in_bounds``: clamped, no gradient).

Every other spelling (optax's losses, one-hot targets, ``logsumexp(z) - z[y]``, shifts
after the projection, label smoothing, biases, vocabulary masks) is matched by
:mod:`xent_match` through a normal form over per-row statistics (:mod:`xent_kernel`).

Fires only where the cost model says it pays: the logits it avoids must be at least
``xent_min_bytes`` (default 32 MiB) and span at least two chunks of ``xent_chunk``
columns (default: as many columns as fit ``xent_chunk_bytes``, 16 MiB of float32 per
chunk). Must not fire when the logits or log-probabilities are read elsewhere (e.g. by
the backward pass already in the jaxpr: decorate the loss instead, the report says so).
"""
from __future__ import annotations

import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.patterns import Match, Rule, View

# Shared with fuse_attention (which imports them): the hint for post-AD jaxprs, the notes
# a rule leaves when it refuses a candidate, and the log-softmax matcher.
POST_AD_HINT = ("the jaxpr already holds the backward pass, which reads the forward's "
                "intermediates, and fuse_before_ad (the loss a step hands to jax.grad / "
                "jax.value_and_grad fused before AD) did not reach it: jax.vjp, a grad "
                "imported by name before tracing, or fuse_before_ad=False; apply "
                "graphopt.optimize to the loss before jax.grad "
                "(jax.grad(graphopt.optimize(loss))) so the fused kernel brings its own backward")
def note(view: View, i: int, rule: str, text: str) -> None:
    """Record ``text`` about the candidate rooted at equation ``i`` for the pass's notes."""
    where = ir.source_line(view.eqns[i]) or view.eqns[i].primitive.name
    view.note(f"{rule}: at {where}: {text}")


def refuse(view: View, i: int, rule: str, why: str) -> None:
    """Leave the candidate at equation ``i`` unfused, saying why; returns None for ``find``."""
    note(view, i, rule, "not applied: " + why)
    return None


def _through(view: View, atom, prims, eqns):
    """Follow producers of kinds ``prims`` back from ``atom``, recording them."""
    while True:
        e = view.producer_eqn(atom)
        if e is None or e.primitive.name not in prims:
            return atom
        eqns.add(view.producer[atom])
        atom = e.invars[0]


def _prod(view, atom, *names):
    e = view.producer_eqn(atom)
    return e if e is not None and e.primitive.name in names else None


def _reduce(view, atom, prim, eqns):
    """``atom`` = broadcast(reduce ``prim`` over one axis of x): (x, axis) or None.

    Casts around the reduction are looked through: bf16 softmax sums in float32
    (convert → reduce_sum → convert back), which the fused kernel also does.
    """
    a = _through(view, atom, ("broadcast_in_dim", "reshape", "convert_element_type"), eqns)
    e = _prod(view, a, prim)
    if e is None or len(e.params["axes"]) != 1:
        return None
    eqns.add(view.producer[a])
    x = _through(view, e.invars[0], ("convert_element_type",), eqns)
    return x, e.params["axes"][0]


def _max_of(view, atom, eqns):
    """``atom`` = [stop_gradient] broadcast(max(-inf, reduce_max(x))): x or None."""
    a = _through(view, atom, ("broadcast_in_dim", "reshape", "stop_gradient"), eqns)
    e = _prod(view, a, "max")
    if e is not None:
        x, y = e.invars
        if view.scalar_value(x) == -np.inf:
            a = y
        elif view.scalar_value(y) == -np.inf:
            a = x
        else:
            return None
        eqns.add(view.producer[e.outvars[0]])
    e = _prod(view, a, "reduce_max")
    if e is None or len(e.params["axes"]) != 1:
        return None
    eqns.add(view.producer[a])
    return e.invars[0], e.params["axes"][0]


def _centered(view, z, eqns):
    """``z`` = s - max(s) (stabilized) or s itself: (s, axis of the max or None)."""
    e = _prod(view, z, "sub")
    if e is not None:
        got = _max_of(view, e.invars[1], set())
        if got is not None and got[0] is e.invars[0]:
            _max_of(view, e.invars[1], eqns)
            eqns.add(view.producer[z])
            return e.invars[0], got[1]
    return z, None


def log_softmax_input(view: View, L, eqns: set):
    """``L`` = log_softmax(z) over one axis: (z, axis) or None."""
    e = _prod(view, L, "sub")
    if e is None:
        return None
    local = {view.producer[L]}
    hh, lg = e.invars
    lg = _through(view, lg, ("broadcast_in_dim", "reshape"), local)
    lge = _prod(view, lg, "log")
    if lge is None:
        return None
    local.add(view.producer[lg])
    red = _reduce(view, lge.invars[0], "reduce_sum", local)
    if red is None:
        return None
    ex = _prod(view, red[0], "exp")
    if ex is None or ex.invars[0] is not hh:
        return None
    local.add(view.producer[red[0]])
    z, ax = _centered(view, hh, local)
    if ax is not None and ax != red[1]:
        return None
    eqns |= local
    return z, red[1]



_DN = (((1,), (0,)), ((), ()))   # [n, d] · [d, c]


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _chunks(w, chunk, w_vd):
    """W as [n_chunks, d, chunk], zero-padded past V."""
    wt = w.T if w_vd else w
    d, v = wt.shape
    n = -(-v // chunk)
    wt = jnp.pad(wt, ((0, 0), (0, n * chunk - v)))
    return jnp.transpose(wt.reshape(d, n, chunk), (1, 0, 2))


@functools.lru_cache(maxsize=None)
def _make(chunk: int, w_vd: bool, zdt, acc, precision):
    """The chunked log p(label) function for one configuration (custom_jvp).

    ``zdt``: dtype of the original logits (the dot's output); ``acc``: dtype of the
    softmax and of every accumulation (``zdt`` promoted to at least float32).
    """
    def dot(a, b):
        return lax.dot_general(a, b, _DN, precision=precision, preferred_element_type=zdt).astype(acc)

    def logits(h, wk, off, v):
        z = dot(h, wk)
        col = off + jnp.arange(wk.shape[1])
        return jnp.where(col[None, :] < v, z, -jnp.inf), col

    def stats(h, w, idx):
        v = w.shape[0] if w_vd else w.shape[1]
        wc = _chunks(w, chunk, w_vd)
        n = h.shape[0]

        def body(carry, xs):
            m, s, tgt = carry
            z, col = logits(h, xs[0], xs[1], v)
            m_new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
            tgt = tgt + jnp.where(col[None, :] == idx[:, None], z, 0).sum(axis=1)
            return (m_new, s, tgt), None

        init = (jnp.full((n,), -jnp.inf, acc), jnp.zeros((n,), acc), jnp.zeros((n,), acc))
        (m, s, tgt), _ = lax.scan(body, init, (wc, jnp.arange(wc.shape[0]) * chunk))
        lse = m + jnp.log(s)
        return tgt - lse, lse

    @jax.custom_jvp
    def logprob(h, w, idx):
        return stats(h, w, idx)[0]

    def jvp(primals, tangents):
        h, w, idx = primals
        dh, dw, _ = tangents
        out, lse = stats(h, w, idx)
        if _is_zero(dh) and _is_zero(dw):
            return out, jnp.zeros_like(out)
        v = w.shape[0] if w_vd else w.shape[1]
        xs = {"wk": _chunks(w, chunk, w_vd), "off": jnp.arange(-(-v // chunk)) * chunk}
        if not _is_zero(dw):
            xs["dwk"] = _chunks(dw, chunk, w_vd)
        # dh enters in acc: reverse mode then sums its per-chunk cotangents in acc, not bf16.
        dh_acc = None if _is_zero(dh) else dh.astype(acc)

        # Recomputed, not saved: reverse mode would otherwise keep every chunk's softmax.
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def body(t, xs):
            z, col = logits(h, xs["wk"], xs["off"], v)
            c = (col[None, :] == idx[:, None]).astype(acc) - jnp.exp(z - lse[:, None])
            dz = 0
            if dh_acc is not None:
                dz = dz + dot(dh_acc.astype(h.dtype), xs["wk"])
            if "dwk" in xs:
                dz = dz + dot(h, xs["dwk"])
            return t + (dz * c).sum(axis=1), None

        t, _ = lax.scan(body, jnp.zeros_like(out), xs)
        return out, t

    logprob.defjvp(jvp, symbolic_zeros=True)
    return logprob


def chunked_logprob(h, w, labels, *, chunk: int = 1024, w_vd: bool = False, preferred=None,
                    precision=None, acc=None):
    """log_softmax(h @ w)[label] per token without materializing the logits.

    h: [..., d]; w: [d, V] (or [V, d] with ``w_vd``); labels: int [...] in [0, V).
    ``preferred`` / ``precision``: those of the ``h @ w`` dot; ``acc``: dtype of the
    softmax and the sums (never below the logits' dtype and float32, the default).
    Returns [...] in ``acc``. Use it by hand in a loss, or let the fusion insert it.
    """
    lead = h.shape[:-1]
    v = w.shape[0] if w_vd else w.shape[1]
    chunk = int(min(chunk, v))
    zdt = np.dtype(preferred) if preferred is not None else np.dtype(jnp.result_type(h, w))
    floor = jnp.float32 if acc is None else jnp.promote_types(acc, jnp.float32)
    acc = np.dtype(jnp.promote_types(zdt, floor))
    fn = _make(chunk, bool(w_vd), zdt, acc, precision)
    out = fn(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1).astype(jnp.int32))
    return out.reshape(lead)


def chunked_cross_entropy(h, w, labels, *, chunk: int = 1024, w_vd: bool = False):
    """Mean softmax cross-entropy of ``h @ w`` against integer ``labels``, chunked."""
    return -jnp.mean(chunked_logprob(h, w, labels, chunk=chunk, w_vd=w_vd))


_MODES = ("CLIP", "FILL_OR_DROP", "PROMISE_IN_BOUNDS")


def _read_outside(view: View, eqns, out) -> bool:
    """True if a value computed inside ``eqns`` (other than ``out``) is read outside them."""
    for k in eqns:
        for v in view.eqns[k].outvars:
            if ir.is_var(v) and v is not out and (
                    v in view.outputs or any(u not in eqns for u in view.users.get(v, ()))):
                return True
    return False


class CrossEntropyRule(Rule):
    def __init__(self):
        super().__init__("fuse.cross_entropy", roots=("gather",))

    def find(self, view: View, i: int) -> Match | None:
        g = view.eqns[i]
        L, idx = g.invars
        eqns = {i}
        got = log_softmax_input(view, L, eqns)
        if got is None:
            return None
        z, ax = got
        if ax != L.aval.ndim - 1:
            return None
        dn, p = g.params["dimension_numbers"], g.params
        others = tuple(d for d in range(L.aval.ndim) if d != ax)
        if (tuple(dn.offset_dims) != () or tuple(dn.collapsed_slice_dims) != (ax,)
                or tuple(dn.start_index_map) != (ax,) or tuple(dn.operand_batching_dims) != others
                or tuple(dn.start_indices_batching_dims) != tuple(range(len(others)))
                or tuple(p["slice_sizes"]) != (1,) * L.aval.ndim):
            return None
        out_aval = g.outvars[0].aval
        if int(np.prod(out_aval.shape)) != int(np.prod(L.aval.shape[:-1])):
            return None
        ze = view.producer_eqn(z)
        if ze is not None and ze.primitive.name == "convert_element_type":
            eqns.add(view.producer[z])
            z = ze.invars[0]
        de = view.producer_eqn(z)
        if de is None or de.primitive.name != "dot_general":
            return None
        (lc, rc), (lb, rb) = de.params["dimension_numbers"]
        h, w = de.invars
        if lb or rb or tuple(lc) != (h.aval.ndim - 1,) or w.aval.ndim != 2:
            return None
        w_vd = tuple(rc) == (1,)
        eqns.add(view.producer[z])
        n_tok = int(np.prod(h.aval.shape[:-1]))
        v = w.aval.shape[0 if w_vd else 1]
        chunk = view.option("xent_chunk", None)
        if chunk is None:
            chunk = max(128, (view.option("xent_chunk_bytes", 16 << 20) // (4 * max(n_tok, 1))) // 128 * 128)
        chunk = int(min(chunk, v))
        if 4 * n_tok * v < view.option("xent_min_bytes", 32 << 20) or v < 2 * chunk:
            return None  # logits small enough that chunking would only cost time
        mode = getattr(p["mode"], "name", str(p["mode"]))
        if mode not in _MODES:
            return refuse(view, i, self.name, f"gather mode {mode} (out-of-range labels) is not "
                          "reproduced by the chunked kernel")
        if not jnp.issubdtype(idx.aval.dtype, jnp.integer):
            return None
        fill = p.get("fill_value")
        fill = np.nan if fill is None else fill
        pet = de.params.get("preferred_element_type")
        prec = de.params.get("precision")
        ldtype = L.aval.dtype
        zdt = np.dtype(pet) if pet is not None else np.dtype(z.aval.dtype)

        def fused(h, w, idx):
            lab = idx.reshape(h.shape[:-1])
            # The gather's bounds in the labels' own dtype (int8 labels, V > 127: all valid).
            hi = int(min(v - 1, jnp.iinfo(lab.dtype).max))
            valid = (lab >= 0) & (lab <= hi)
            lp = chunked_logprob(h, w, jnp.clip(lab, 0, hi), chunk=chunk, w_vd=w_vd,
                                 preferred=zdt, precision=prec, acc=ldtype)
            if mode == "FILL_OR_DROP":
                lp = jnp.where(valid, lp, jnp.asarray(fill, lp.dtype))
            elif mode == "PROMISE_IN_BOUNDS":  # XLA clamps the read; the scatter drops the cotangent
                lp = jnp.where(valid, lp, lax.stop_gradient(lp))
            return lp.astype(ldtype).reshape(out_aval.shape)

        if _read_outside(view, eqns, g.outvars[0]):
            return None  # XentRegionRule, rooted at the dot, says why (one line per candidate)
        note = POST_AD_HINT if getattr(view.ctx, "placement", "") == "post-AD" else ""
        m = Match(self.name, frozenset(eqns), [g.outvars[0]], fused, [h, w, idx], note=note)
        return m


# The take_along_axis(log_softmax(h @ W)) spelling first (rooted at the gather, later in
# the program); every other spelling through the normal forms of xent_match.
from .xent_match import XentRegionRule  # noqa: E402
from .xent_kernel import vocab_stats  # noqa: E402

RULES = [CrossEntropyRule(), XentRegionRule()]

__all__ = ["vocab_stats", "XentRegionRule", "chunked_logprob", "chunked_cross_entropy", "CrossEntropyRule", "RULES", "POST_AD_HINT",
           "log_softmax_input", "note", "refuse"]
