"""Fold a per-channel affine (batch norm after the activation) into the NEXT dense or conv.

Rewrites ``dot(x * s + t, W)`` (any chain of ``add/sub/mul/div/neg`` with per-channel
constants along the contracted axis, e.g. inference batch norm after a ReLU) into
``dot(x, s ⊙ W) + t · W``, and ``conv(x * s + t, W)`` into ``conv(x, W * s[in]) + Σ t·W``
(the shift summed over input channels and the window, one constant per output channel).

Must not fire (each says why in the report): when the affine's output has another reader,
when a scale or shift is computed from the activation itself (training-mode batch
statistics), for a conv that pads or dilates its input while the chain shifts (zero padding
is not shifted, so border outputs would differ; a pure scale folds into any conv), for a
grouped conv, when the weights are larger than the activation (scaling them would cost more
than the elementwise pass it saves), or for mixed dtypes. Left alone without a note: chains
without a per-channel scale, the scale and shift of a layer/RMS norm (their source is a row
normalization: they belong to that norm and to the fusions that match it), and chains the
preceding conv/dense absorbs (``FoldAffine`` folds those backwards, pads or not).
Rounding: sums run in another order (float32 ~1e-6 relative).
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.patterns import Match, Rule, View

from .fuse_batchnorm_prev import AFFINE, FoldAffine, _per_channel

_PREV = FoldAffine()


def _sides(eqn):
    """[(activation operand index, its channel axis, weight's input axis, weight's output
    axes or None)] the rule may fold into; empty when none."""
    p = eqn.params
    if eqn.primitive.name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        return [(0, dn.lhs_spec[1], dn.rhs_spec[1], dn.rhs_spec[0])]
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb or len(lc) != 1:
        return []  # a batched or multi-axis contraction is no dense layer
    return [(0, lc[0], rc[0], None), (1, rc[0], lc[0], None)]


def _varies_only_off(view: View, o, shape, c) -> bool:
    """True if ``o`` is constant along axis ``c`` but varies along another (a per-row statistic)."""
    s = tuple(o.aval.shape)
    if len(s) != len(shape):
        return False
    eff = list(s)
    e = view.producer_eqn(o)
    if e is not None and e.primitive.name == "broadcast_in_dim" and s == tuple(shape):
        eff = [1] * len(shape)
        for k, d in zip(e.params["broadcast_dimensions"], e.invars[0].aval.shape):
            eff[k] = d
    return eff[c] == 1 and any(d > 1 for k, d in enumerate(eff) if k != c)


def _row_normalized(view: View, src, shape, c) -> bool:
    """True if ``src`` is a layer/RMS norm's normalized value (``x * rsqrt(row stat)``)."""
    e = view.producer_eqn(src)
    if e is None or e.primitive.name not in ("mul", "div"):
        return False
    return any(ir.is_var(o) and _varies_only_off(view, o, shape, c) for o in e.invars)


def _chain(view: View, act, c):
    """(source, forward steps [(name, vec, y_lhs)], equation indices) of the affine chain
    ending in ``act``; walks back while each value has one reader."""
    shape, dtype = tuple(act.aval.shape), act.aval.dtype
    steps, eqns, y = [], set(), act
    while ir.is_var(y) and (y is act or (view.n_uses(y) == 1 and y not in view.outputs)):
        k = view.producer.get(y)
        if k is None:
            break
        u = view.eqns[k]
        name = u.primitive.name
        if name not in AFFINE or tuple(u.outvars[0].aval.shape) != shape or u.outvars[0].aval.dtype != dtype:
            break
        if name == "neg":
            step, prev = ("neg", None, True), u.invars[0]
        else:
            a, b = u.invars
            found = None
            for y_lhs, src, o in ((True, a, b), (False, b, a)):
                if name == "div" and not y_lhs:
                    continue  # o / y is not affine in y
                if tuple(getattr(src.aval, "shape", ())) != shape or src is o:
                    continue
                vec = _per_channel(view, o, shape, c)
                # An operand as large as the activation and computed from it is no constant
                # (gelu's x * Φ(x) on a one-row batch looks per-channel by shape).
                if vec is not None and not (ir.is_var(o) and o.aval.size >= act.aval.size
                                            and view.depends_on(o, {src})):
                    found = ((name, vec, y_lhs), src)
                    break
            if found is None:
                break
            step, prev = found
        steps.append(step)
        eqns.add(k)
        y = prev
    return y, steps[::-1], eqns


class FoldAffineNext(Rule):
    """per-channel affine chain → dot/conv ⇒ dot/conv on scaled weights + constant bias."""

    def __init__(self):
        super().__init__("fuse.batchnorm_fold_next", roots=("conv_general_dilated", "dot_general"))

    def find(self, view: View, i: int) -> Match | None:
        root = view.eqns[i]
        for side in _sides(root):
            m = self._find(view, i, root, *side)
            if m is not None:
                return m
        return None

    def _refuse(self, view: View, root, why: str) -> None:
        view.note(f"{self.name}: not applied at {ir.source_line(root) or root.primitive.name}: {why}")

    def _find(self, view: View, i, root, a_idx, c, w_in, w_out) -> Match | None:
        act, w = root.invars[a_idx], root.invars[1 - a_idx]
        if not ir.is_var(act) or not np.issubdtype(act.aval.dtype, np.floating):
            return None
        shape = tuple(act.aval.shape)
        src, steps, eqns = _chain(view, act, c)
        if not _is_foldable_norm(view, src, steps, shape, c, self.roots):
            return None
        why = _refusal(view, root, act, w, src, steps, shape)
        if why is not None:
            self._refuse(view, root, why)
            return None
        vecs = [v for _, v, _ in steps if v is not None]
        folded = _folded_fn(root, steps, a_idx, shape[c], w_in, w_out)
        return Match(self.name, frozenset(eqns | {i}), [root.outvars[0]], folded, [src, w, *vecs])


def _is_foldable_norm(view: View, src, steps, shape, c, roots) -> bool:
    """False, without a note, for chains that are no batch norm of the next layer's input."""
    if not any(n in ("mul", "div") and v is not None and v.aval.shape != () for n, v, _ in steps):
        return False  # no per-channel scale: not a batch norm
    if _row_normalized(view, src, shape, c):
        return False  # a layer/RMS norm's own scale and shift stay with it
    k = view.producer.get(src) if ir.is_var(src) else None
    if k is not None and view.eqns[k].primitive.name in roots and _PREV.find(view, k) is not None:
        return False  # the preceding conv/dense absorbs it (FoldAffine)
    return True


def _refusal(view: View, root, act, w, src, steps, shape) -> str | None:
    """Why the chain must not fold into ``root`` (said in the report), or None."""
    out = root.outvars[0]
    vecs = [v for _, v, _ in steps if v is not None]
    k = view.producer.get(src) if ir.is_var(src) else None
    first = k if k is not None else -1  # SSA: a value made before src cannot read it
    if any(ir.is_var(v) and view.producer.get(v, -1) > first and view.depends_on(v, {src})
           for v in vecs):
        return ("the scale/shift are computed from the activation itself "
                "(training-mode batch statistics); only running statistics fold")
    if view.n_uses(act) != 1 or act in view.outputs:
        return ("the per-channel affine's output has another reader "
                "(or is a program output), so it stays")
    if not (act.aval.dtype == w.aval.dtype == out.aval.dtype):
        return "activation, weight and output dtypes differ"
    shifts = any(n in ("add", "sub") for n, _, _ in steps)
    if root.primitive.name == "conv_general_dilated":
        p = root.params
        if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
            return "grouped convolution"
        pads = any(lo > 0 or hi > 0 for lo, hi in p["padding"])
        if shifts and (pads or any(d != 1 for d in p.get("lhs_dilation") or ())):
            return ("the conv pads (SAME) or dilates its input with zeros, "
                    "which the shift does not reach: border outputs would differ; "
                    "only a VALID conv takes a shift")
    if int(np.prod(w.aval.shape)) > int(np.prod(shape)):
        return ("the weights are larger than the activation: scaling them "
                "would cost more than the elementwise pass it saves")
    return None


def _folded_fn(root, steps, a_idx, n_ch, w_in, w_out):
    """The replacement: ``root`` on weights scaled per input channel, plus the shift's bias."""
    plan = [(n, y_lhs) for n, _, y_lhs in steps]
    shifts = any(n in ("add", "sub") for n, _ in plan)
    prim, params = root.primitive, dict(root.params)
    is_conv = prim.name == "conv_general_dilated"
    o_ndim = root.outvars[0].aval.ndim

    def folded(x, wt, *vs):
        dt = x.dtype
        it = iter(vs)
        s = jnp.ones((n_ch,), dt)
        t = jnp.zeros((n_ch,), dt)
        for name, y_lhs in plan:  # compose y -> a*y + b step by step
            if name == "neg":
                s, t = -s, -t
                continue
            v = jnp.broadcast_to(jnp.ravel(next(it)).astype(dt), (n_ch,))
            if name == "add":
                t = t + v
            elif name == "sub":
                s, t = (s, t - v) if y_lhs else (-s, v - t)
            elif name == "mul":
                s, t = s * v, t * v
            else:
                s, t = s / v, t / v
        bshape = [1] * wt.ndim
        bshape[w_in] = n_ch
        ops = [None, None]
        ops[a_idx], ops[1 - a_idx] = x, wt * s.reshape(bshape)
        y = prim.bind(*ops, **params)
        if not shifts:
            return y
        if is_conv:  # every window lies inside the input: the shift adds Σ t·W per output channel
            bias = jnp.sum(wt * t.reshape(bshape), axis=tuple(d for d in range(wt.ndim) if d != w_out))
            oshape = [1] * o_ndim
            oshape[params["dimension_numbers"].out_spec[1]] = bias.shape[0]
            return y + bias.reshape(oshape)
        bias = lax.dot_general(t, wt, (((0,), (w_in,)), ((), ())), precision=params.get("precision"))
        free = o_ndim - bias.ndim  # the activation's free axes in the output
        oshape = (1,) * free + bias.shape if a_idx == 0 else bias.shape + (1,) * free
        return y + bias.reshape(oshape)

    return folded

__all__ = ["FoldAffineNext"]
