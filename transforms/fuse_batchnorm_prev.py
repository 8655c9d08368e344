"""The previous-layer direction of ``fuse_batchnorm``: fold a per-channel affine chain
(inference batch norm) into the conv or dense that produced its input.

``FoldAffine`` and the per-channel helpers it shares with ``fuse_batchnorm_next``; the
family's rule list and its documentation are in ``fuse_batchnorm``.
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp

from graphopt import ir
from graphopt.patterns import Match, Rule, View

AFFINE = frozenset({"add", "sub", "mul", "div", "neg"})


def _channel_axes(eqn):
    """(output channel axis, operand index to scale, that operand's channel axis) or None."""
    p = eqn.params
    if eqn.primitive.name == "conv_general_dilated":
        if p.get("batch_group_count", 1) != 1:
            return None
        dn = p["dimension_numbers"]
        return dn.out_spec[1], 1, dn.rhs_spec[0]
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lhs, rhs = eqn.invars
    l_free = [d for d in range(lhs.aval.ndim) if d not in lc and d not in lb]
    r_free = [d for d in range(rhs.aval.ndim) if d not in rc and d not in rb]
    out_ndim = eqn.outvars[0].aval.ndim
    # Prefer the last output axis (features), found among the rhs free dims.
    if r_free:
        return out_ndim - 1, 1, r_free[-1]
    if l_free:
        return len(lb) + len(l_free) - 1, 0, l_free[-1]
    return None


def _per_channel(view: View, o, shape, c):
    """``o`` (or the array it broadcasts) if it varies only along axis ``c``, else None."""
    s = tuple(o.aval.shape)
    if s == ():
        return o
    if len(s) != len(shape):
        return None
    e = view.producer_eqn(o)
    if e is not None and e.primitive.name == "broadcast_in_dim":
        # Any spelling of the broadcast: (C,) at axis c, or (1, .., C) kept at full rank.
        eff = [1] * len(s)
        for k, d in zip(e.params["broadcast_dimensions"], e.invars[0].aval.shape):
            eff[k] = d
        if all(d == 1 for k, d in enumerate(eff) if k != c):
            return e.invars[0]
    if all(d == 1 for k, d in enumerate(s) if k != c) and s[c] in (1, shape[c]):
        return o
    return None


class FoldAffine(Rule):
    """conv/dot → per-channel affine chain ⇒ conv/dot on scaled weights + bias."""

    def __init__(self):
        super().__init__("fuse.batchnorm_fold", roots=("conv_general_dilated", "dot_general"))

    def find(self, view: View, i: int) -> Match | None:
        root = view.eqns[i]
        axes = _channel_axes(root)
        if axes is None:
            return None
        c, w_idx, w_axis = axes
        y0 = root.outvars[0]
        shape = tuple(y0.aval.shape)
        if not np.issubdtype(y0.aval.dtype, np.floating):
            return None
        steps, eqns, y = [], {i}, y0
        while view.n_uses(y) == 1 and y not in view.outputs:
            (k,) = view.users[y]
            u = view.eqns[k]
            name = u.primitive.name
            if name not in AFFINE or tuple(u.outvars[0].aval.shape) != shape \
                    or u.outvars[0].aval.dtype != y0.aval.dtype:
                break
            if name == "neg":
                steps.append(("neg", None, True))
            else:
                a, b = u.invars
                if a is y and b is y:
                    break
                y_lhs = a is y
                o = b if y_lhs else a
                if name == "div" and not y_lhs:
                    break  # o / y is not affine in y
                vec = _per_channel(view, o, shape, c)
                # SSA: a value produced before the root cannot read the root's output (O(1)).
                if vec is None or (ir.is_var(o) and view.producer.get(o, -1) > i
                                   and view.depends_on(o, {y0})):
                    break  # training-mode statistics read the conv's own output
                steps.append((name, vec, y_lhs))
            eqns.add(k)
            y = u.outvars[0]
        scales = sum(s[0] in ("mul", "div", "neg") for s in steps)
        vectors = sum(s[1] is not None and s[1].aval.shape != () for s in steps)
        # Scalar-only chains are left alone (attention's q·kᵀ scale belongs to that fusion).
        if not vectors or (scales == 0 and len(steps) < 2):
            return None
        w = root.invars[w_idx]
        if w.aval.dtype != y0.aval.dtype:
            return None  # a low-precision weight feeding a wider output would lose the scale's precision
        if int(np.prod(w.aval.shape)) > int(np.prod(shape)):
            return None  # scaling the weights would cost more than the pass it saves
        n_ch = shape[c]
        vecs = [s[1] for s in steps if s[1] is not None]
        plan = [(s[0], s[2]) for s in steps]
        prim, params = root.primitive, dict(root.params)

        def folded(lhs, rhs, *vs):
            dt = y0.aval.dtype
            it = iter(vs)
            a = jnp.ones((n_ch,), dt)
            b = jnp.zeros((n_ch,), dt)
            for name, y_lhs in plan:
                if name == "neg":
                    a, b = -a, -b
                    continue
                v = jnp.broadcast_to(jnp.ravel(next(it)).astype(dt), (n_ch,))
                if name == "add":
                    b = b + v
                elif name == "sub":
                    a, b = (a, b - v) if y_lhs else (-a, v - b)
                elif name == "mul":
                    a, b = a * v, b * v
                else:
                    a, b = a / v, b / v
            ops = [lhs, rhs]
            wt = ops[w_idx]
            bshape = [1] * wt.ndim
            bshape[w_axis] = n_ch
            ops[w_idx] = (wt * a.astype(wt.dtype).reshape(bshape)).astype(wt.dtype)
            out = prim.bind(*ops, **params)
            oshape = [1] * len(shape)
            oshape[c] = n_ch
            return out + b.reshape(oshape).astype(out.dtype)

        return Match(self.name, frozenset(eqns), [y], folded, [root.invars[0], root.invars[1], *vecs])


__all__ = ["AFFINE", "FoldAffine"]
