"""Fuse the output projection with softmax cross-entropy, computed in vocabulary chunks.

Matches ``take_along_axis(log_softmax(h @ W), labels)`` (``W`` as [d, V] or [V, d], an
optional cast of the logits, ``log_softmax`` stabilized or not) and replaces it with
:func:`chunked_logprob`: a scan over vocabulary chunks keeps a running log-sum-exp and
the label's logit, and a custom backward recomputes each chunk's softmax, so the full
[tokens, V] logits never exist, forward or backward. Identity:
``log_softmax(z)[y] = z[y] - logsumexp(z)`` and logsumexp combines over chunks
(``lse(a ∪ b) = m + log(e^{lse(a)-m} + e^{lse(b)-m})``); the gradient w.r.t. the
logits is ``onehot(y) - softmax(z)``, chunk by chunk.

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

from graphopt.patterns import Match, Rule, View
from .fuse_attention import POST_AD_HINT, log_softmax_input


def _chunks(w, chunk, w_vd):
    """W as [n_chunks, d, chunk], zero-padded past V."""
    wt = w.T if w_vd else w
    d, v = wt.shape
    n = -(-v // chunk)
    wt = jnp.pad(wt, ((0, 0), (0, n * chunk - v)))
    return jnp.transpose(wt.reshape(d, n, chunk), (1, 0, 2))


def _chunk_logits(h, wk, off, v, pet):
    z = lax.dot_general(h, wk, (((1,), (0,)), ((), ())), preferred_element_type=pet)
    z = z.astype(jnp.float32)
    col = off + jnp.arange(wk.shape[1])
    return jnp.where(col[None, :] < v, z, -jnp.inf), col


@functools.lru_cache(maxsize=None)
def _make(chunk: int, w_vd: bool, pet):
    """The chunked log p(label) function for one configuration (custom backward)."""

    def stats(h, w, idx):
        v = w.shape[0] if w_vd else w.shape[1]
        wc = _chunks(w, chunk, w_vd)
        offs = jnp.arange(wc.shape[0]) * chunk
        n = h.shape[0]

        def body(carry, xs):
            m, s, tgt = carry
            z, col = _chunk_logits(h, xs[0], xs[1], v, pet)
            m_new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
            tgt = tgt + jnp.where(col[None, :] == idx[:, None], z, 0.0).sum(axis=1)
            return (m_new, s, tgt), None

        init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
                jnp.zeros((n,), jnp.float32))
        (m, s, tgt), _ = lax.scan(body, init, (wc, offs))
        lse = m + jnp.log(s)
        return tgt - lse, lse

    @jax.custom_vjp
    def logprob(h, w, idx):
        return stats(h, w, idx)[0]

    def fwd(h, w, idx):
        out, lse = stats(h, w, idx)
        return out, (h, w, idx, lse)

    def bwd(res, g):
        h, w, idx, lse = res
        v = w.shape[0] if w_vd else w.shape[1]
        wc = _chunks(w, chunk, w_vd)
        offs = jnp.arange(wc.shape[0]) * chunk

        def body(dh, xs):
            wk, off = xs
            z, col = _chunk_logits(h, wk, off, v, pet)
            p = jnp.exp(z - lse[:, None])
            gz = (g[:, None] * ((col[None, :] == idx[:, None]).astype(jnp.float32) - p)).astype(h.dtype)
            dh = dh + lax.dot_general(gz, wk, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            dwk = lax.dot_general(h, gz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return dh, dwk

        dh, dwc = lax.scan(body, jnp.zeros(h.shape, jnp.float32), (wc, offs))
        dw = jnp.transpose(dwc, (1, 0, 2)).reshape(h.shape[1], -1)[:, :v]
        dw = (dw.T if w_vd else dw).astype(w.dtype)
        return dh.astype(h.dtype), dw, None

    logprob.defvjp(fwd, bwd)
    return logprob


def chunked_logprob(h, w, labels, *, chunk: int = 1024, w_vd: bool = False, preferred=None):
    """log_softmax(h @ w)[label] per token without materializing the logits.

    h: [..., d]; w: [d, V] (or [V, d] with ``w_vd``); labels: int [...] in [0, V).
    Returns float32 [...]. Use it by hand in a loss, or let the fusion insert it.
    """
    lead = h.shape[:-1]
    v = w.shape[0] if w_vd else w.shape[1]
    chunk = int(min(chunk, v))
    fn = _make(chunk, bool(w_vd), np.dtype(preferred) if preferred is not None else None)
    out = fn(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1).astype(jnp.int32))
    return out.reshape(lead)


def chunked_cross_entropy(h, w, labels, *, chunk: int = 1024, w_vd: bool = False):
    """Mean softmax cross-entropy of ``h @ w`` against integer ``labels``, chunked."""
    return -jnp.mean(chunked_logprob(h, w, labels, chunk=chunk, w_vd=w_vd))


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
        if lb or rb or tuple(lc) != (h.aval.ndim - 1,) or w.aval.ndim != 2 or de.params.get("precision"):
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
        fill = p.get("fill_value")
        fill = np.nan if fill is None else fill
        pet = de.params.get("preferred_element_type")
        ldtype = L.aval.dtype

        def fused(h, w, idx):
            lab = idx.reshape(h.shape[:-1])
            valid = (lab >= 0) & (lab < v)
            lp = chunked_logprob(h, w, jnp.clip(lab, 0, v - 1), chunk=chunk, w_vd=w_vd, preferred=pet)
            if "FILL" in mode:
                lp = jnp.where(valid, lp, jnp.asarray(fill, lp.dtype))
            return lp.astype(ldtype).reshape(out_aval.shape)

        note = POST_AD_HINT if getattr(view.ctx, "placement", "") == "post-AD" else ""
        m = Match(self.name, frozenset(eqns), [g.outvars[0]], fused, [h, w, idx], note=note)
        return m


RULES = [CrossEntropyRule()]

__all__ = ["chunked_logprob", "chunked_cross_entropy", "CrossEntropyRule", "RULES"]
