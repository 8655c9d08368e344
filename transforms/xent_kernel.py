"""Per-row vocabulary statistics of ``h @ W`` computed in vocabulary chunks.

The kernel behind every cross-entropy spelling the fusion recognises: one scan over
column chunks of ``W`` returns, per row of the logits ``z`` (``h @ W``, then the
program's bias adds, vocabulary masks and casts, in its order):

- ``m``: ``max_j z_j``; ``lse``: ``log Σ_j exp z_j``; ``zy``: ``z_label``;
  ``zsum``: ``Σ_j z_j``.

Every spelling is arithmetic on these: ``log_softmax(z)[y] = zy − lse``,
``Σ_j log_softmax(z)_j = zsum − V·lse``, ``Σ_j exp(z_j − r) = exp(lse − r)``.

Differentiation: a ``custom_jvp`` whose tangent is a second scan, linear in the
tangents, recomputing each chunk under ``jax.checkpoint``; reverse mode transposes it,
so neither direction holds the [rows, V] logits.
"""
from __future__ import annotations

import functools

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

_DN = (((1,), (0,)), ((), ()))   # [n, d] · [d, c]


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _wchunks(w, chunk, w_vd):
    """W as [n_chunks, d, chunk], zero-padded past V."""
    wt = w.T if w_vd else w
    d, v = wt.shape
    n = -(-v // chunk)
    wt = jnp.pad(wt, ((0, 0), (0, n * chunk - v)))
    return jnp.transpose(wt.reshape(d, n, chunk), (1, 0, 2))


def _vchunks(x, chunk):
    """A [V] vector as [n_chunks, chunk] (padding: zeros / False)."""
    n = -(-x.shape[0] // chunk)
    return jnp.pad(x, (0, n * chunk - x.shape[0])).reshape(n, chunk)


@functools.lru_cache(maxsize=None)
def make_stats(chunk: int, w_vd: bool, chain: tuple, zdt, acc, precision):
    """The stats function for one configuration: ``f(h, w, vecs, idx) -> (m, lse, zy, zsum)``.

    ``chain``: the logits' path from the dot, a tuple of ``("cast", dtype)``,
    ``("bias", k)`` (add ``vecs[k]``) and ``("mask", k, fill, keep_is_case1)`` (select
    between ``z`` and the scalar ``fill`` by the boolean ``vecs[k]``).
    """
    zchunk = _zchunk_fn(chain, zdt, acc, precision)
    stats = _stats_fn(zchunk, chunk, w_vd, acc)

    @jax.custom_jvp
    def f(h, w, vecs, idx):
        return stats(h, w, vecs, idx)

    f.defjvp(_jvp_fn(stats, zchunk, chunk, w_vd, acc), symbolic_zeros=True)
    return f


def _zchunk_fn(chain: tuple, zdt, acc, precision):
    """``zchunk(h, wk, vks)``: one chunk of the logits, the chain applied, in ``acc``."""
    def zchunk(h, wk, vks):
        z = lax.dot_general(h, wk, _DN, precision=precision, preferred_element_type=zdt)
        for op in chain:
            if op[0] == "cast":
                z = z.astype(op[1])
            elif op[0] == "bias":
                z = z + vks[op[1]][None, :].astype(z.dtype)
            else:
                _, k, fill, keep1 = op
                f = jnp.asarray(fill, z.dtype)
                pred = vks[k][None, :]
                z = jnp.where(pred, z, f) if keep1 else jnp.where(pred, f, z)
        return z.astype(acc)
    return zchunk


def _prep(w, vecs, chunk, w_vd):
    """The scan's inputs (W's and the vectors' chunks, each chunk's first column) and V."""
    v = w.shape[0] if w_vd else w.shape[1]
    xs = {"wk": _wchunks(w, chunk, w_vd), "vk": tuple(_vchunks(x, chunk) for x in vecs),
          "off": jnp.arange(-(-v // chunk)) * chunk}
    return xs, v


def _stats_fn(zchunk, chunk, w_vd, acc):
    """``stats(h, w, vecs, idx)``: one scan over the chunks, an online max and sum of exp."""
    def stats(h, w, vecs, idx):
        xs, v = _prep(w, vecs, chunk, w_vd)
        n = h.shape[0]

        def body(carry, xs):
            m, s, zy, zs = carry
            z = zchunk(h, xs["wk"], xs["vk"])
            col = xs["off"] + jnp.arange(z.shape[1])
            inside = col[None, :] < v
            zm = jnp.where(inside, z, -jnp.inf)
            m_new = jnp.maximum(m, zm.max(axis=1))
            # A row whose max so far is -inf adds exp(-inf - -inf): keep it 0, not NaN.
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0)
            s = s * jnp.exp(m - safe) + jnp.exp(zm - safe[:, None]).sum(axis=1)
            zy = zy + jnp.where(col[None, :] == idx[:, None], z, 0).sum(axis=1)
            zs = zs + jnp.where(inside, z, 0).sum(axis=1)
            return (m_new, s, zy, zs), None

        zero = jnp.zeros((n,), acc)
        init = (jnp.full((n,), -jnp.inf, acc), zero, zero, zero)
        (m, s, zy, zs), _ = lax.scan(body, init, xs)
        safe = jnp.where(jnp.isfinite(m), m, 0)
        return m, safe + jnp.log(s), zy, zs
    return stats


def _jvp_fn(stats, zchunk, chunk, w_vd, acc):
    """The custom JVP rule: a second scan, linear in the tangents, chunks recomputed."""
    def jvp(primals, tangents):
        h, w, vecs, idx = primals
        dh, dw, dvecs, _ = tangents
        outs = stats(h, w, vecs, idx)
        m, lse = outs[0], outs[1]
        live = {"h": not _is_zero(dh), "w": not _is_zero(dw)}
        dv = tuple(None if _is_zero(t) or not jnp.issubdtype(x.dtype, jnp.inexact) else t
                   for x, t in zip(vecs, dvecs))
        if not live["h"] and not live["w"] and all(t is None for t in dv):
            return outs, tuple(jnp.zeros_like(o) for o in outs)
        xs, v = _prep(w, vecs, chunk, w_vd)
        if live["w"]:
            xs["dwk"] = _wchunks(dw, chunk, w_vd)
        xs["dvk"] = tuple(None if t is None else _vchunks(t, chunk) for t in dv)

        # Recomputed, not saved: reverse mode would otherwise keep every chunk's softmax.
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def body(t, xs):
            fl = [k for k, x in enumerate(xs["vk"]) if jnp.issubdtype(x.dtype, jnp.inexact)]

            def zfun(hh, wk, fvks):  # integer / boolean vectors (masks) have no tangent
                vks = list(xs["vk"])
                for k, x in zip(fl, fvks):
                    vks[k] = x
                return zchunk(hh, wk, tuple(vks))
            prim = (h, xs["wk"], tuple(xs["vk"][k] for k in fl))
            tan = (dh if live["h"] else jnp.zeros_like(h),
                   xs["dwk"] if live["w"] else jnp.zeros_like(xs["wk"]),
                   tuple(jnp.zeros_like(xs["vk"][k]) if xs["dvk"][k] is None
                         else xs["dvk"][k].astype(xs["vk"][k].dtype) for k in fl))
            z, dz = jax.jvp(zfun, prim, tan)
            col = xs["off"] + jnp.arange(z.shape[1])
            inside = col[None, :] < v
            dz = jnp.where(inside, dz, 0)
            top = (inside & (z == m[:, None])).astype(acc)
            p = jnp.where(inside, jnp.exp(z - lse[:, None]), 0)
            dm, cnt, dl, dy, ds = t
            return (dm + (top * dz).sum(1), cnt + top.sum(1), dl + (p * dz).sum(1),
                    dy + jnp.where(col[None, :] == idx[:, None], dz, 0).sum(1), ds + dz.sum(1)), None

        zero = jnp.zeros_like(m)
        (dm, cnt, dl, dy, ds), _ = lax.scan(body, (zero,) * 5, xs)
        dm = dm / jnp.maximum(lax.stop_gradient(cnt), 1)
        return outs, (dm, dl, dy, ds)
    return jvp


def vocab_stats(h, w, labels, *, chunk=1024, w_vd=False, chain=(), vecs=(), zdt=None,
                acc=None, precision=None):
    """(m, lse, zy, zsum) per row of ``h @ w`` (plus ``chain``), never materializing it.

    h: [..., d]; w: [d, V] (or [V, d] with ``w_vd``); labels: int [...] in [0, V).
    """
    lead = h.shape[:-1]
    v = w.shape[0] if w_vd else w.shape[1]
    chunk = int(min(chunk, v))
    zdt = np.dtype(zdt) if zdt is not None else np.dtype(jnp.result_type(h, w))
    floor = jnp.float32 if acc is None else jnp.promote_types(acc, jnp.float32)
    acc = np.dtype(jnp.promote_types(zdt, floor))
    fn = make_stats(chunk, bool(w_vd), tuple(chain), zdt, acc, precision)
    outs = fn(h.reshape(-1, h.shape[-1]), w, tuple(vecs), labels.reshape(-1).astype(jnp.int32))
    return tuple(o.reshape(lead) for o in outs)


__all__ = ["vocab_stats", "make_stats"]
