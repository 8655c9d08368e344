"""Label reads of the cross-entropy matcher (:mod:`xent_match`): one-hot targets built
in the program (``α·one_hot(y) + β``, label smoothing) and ``take_along_axis`` gathers of
the logits at the labels, as arithmetic on the per-row statistic ``z[y]``.

:class:`LabelReads` is a part of ``xent_match``'s region walk (it reads the region's
``view``, ``v`` and forms); kept apart because it is what the region holds about labels.
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax

from graphopt import ir

from .xent_forms import Aff, Lab, Refuse, Row, _add, _neg, _one, _scale, _scale_b, row_index_labels


class LabelReads:
    """The label half of ``xent_match._Region``: finding one-hot targets, checking one
    label array per region, and the per-row values of label reads."""

    def label(self, a):
        """``a`` = α·one_hot(y) + β built outside: a Lab (recording its equations) or None."""
        view = self.view
        e = view.producer_eqn(a)
        if e is None:
            return None
        name = e.primitive.name
        if name == "convert_element_type":
            got = self.label(e.invars[0])
        elif name == "eq":
            got = None
            for y, io in (e.invars, e.invars[::-1]):
                ye = view.producer_eqn(y)
                if (ye is not None and ye.primitive.name == "broadcast_in_dim" and self.is_vocab_iota(io)
                        and y.aval.shape[-1] == 1):
                    got = Lab(None, None, ye.invars[0])
                    self.labeqns |= {view.producer[y]} | ({view.producer[io]} if io in view.producer else set())
                    break
        elif name in ("mul", "add", "sub", "div"):
            x, r = e.invars
            got = self.label(x) if self.is_v(x) else None
            if got is None and name in ("mul", "add"):
                x, r = r, x
                got = self.label(x) if self.is_v(x) else None
            if got is not None:
                rf = self.row_operand(r)
                if name == "mul":
                    got = Lab(_scale(got.alpha, rf), _scale_b(got.beta, rf), got.y)
                elif name == "div":
                    got = Lab(_scale(got.alpha, rf, jnp.divide), _scale_b(got.beta, rf, jnp.divide), got.y)
                else:
                    rf2 = rf if name == "add" else _neg(rf)
                    got = Lab(got.alpha, _add(got.beta, rf2), got.y)
        else:
            return None
        if got is not None:
            self.labeqns.add(view.producer[a])
        return got

    def is_vocab_iota(self, io) -> bool:
        """``io`` = arange(V) along the last axis (an iota, or one folded to a constant)."""
        if not ir.is_var(io) or io.aval.shape[-1] != self.v or io.aval.size != self.v:
            return False
        ie = self.view.producer_eqn(io)
        if ie is not None and ie.primitive.name == "iota":
            return ie.params["dimension"] == io.aval.ndim - 1
        val = self.view.constant_value(io)
        return val is not None and np.array_equal(np.asarray(val).reshape(-1), np.arange(self.v))

    def row_operand(self, r):
        f = self.form_of(r)
        if not isinstance(f, Row):
            raise Refuse("one-hot targets combined with a non per-row value")
        return f.f

    def set_labels(self, y, sel):
        key = (y, tuple(id(op) for op in sel))
        if self.zy_key is not None and self.zy_key[0] != key:
            raise Refuse("the logits are indexed with two different label arrays or row shifts")
        self.zy_key = (key, y, sel)
        self.ref(y)

    def labels(self, E, y, rows):
        lab = jnp.reshape(E.get(y), rows)
        hi = int(min(self.v - 1, jnp.iinfo(lab.dtype).max))
        return lab, (lab >= 0) & (lab <= hi), jnp.clip(lab, 0, hi)

    def onehot_sum(self, p):
        x, lab = p.aff, p.lab
        self.set_labels(lab.y, x.sel)
        def f(E):
            zy = E.stat("zy", x.sel)
            _, valid, _ = self.labels(E, lab.y, zy.shape[:-1])
            valid = valid[..., None]
            hit = _one(x.a)(E) * zy + (x.b(E) if x.b is not None else 0)
            # one_hot(y) · x is select(y == j, x, 0) once compiled (XLA rewrites it so): no 0 · inf.
            term = jnp.where(valid, hit, 0)
            if lab.beta is not None:
                return _one(lab.alpha)(E) * term + lab.beta(E) * self.affine_sum(x)(E)
            return _one(lab.alpha)(E) * term
        return f

    def gather(self, e, x):
        view = self.view
        L, idx = e.invars
        ax = L.aval.ndim - 1
        dn, p = e.params["dimension_numbers"], e.params
        others = tuple(range(ax))
        rows_idx = row_index_labels(self.view, e) if isinstance(x, Aff) else None
        if rows_idx is not None:
            idx = rows_idx
        elif (not isinstance(x, Aff) or tuple(dn.offset_dims) != () or tuple(dn.collapsed_slice_dims) != (ax,)
                or tuple(dn.start_index_map) != (ax,) or tuple(dn.operand_batching_dims) != others
                or tuple(dn.start_indices_batching_dims) != tuple(range(len(others)))
                or tuple(p["slice_sizes"]) != (1,) * L.aval.ndim):
            raise Refuse("a gather from the logits that is not take_along_axis over the vocabulary")
        mode = getattr(p["mode"], "name", str(p["mode"]))
        if mode not in ("CLIP", "FILL_OR_DROP", "PROMISE_IN_BOUNDS"):
            raise Refuse(f"gather mode {mode} is not reproduced by the chunked kernel")
        if not jnp.issubdtype(idx.aval.dtype, jnp.integer):
            raise Refuse("non-integer labels")
        fill = p.get("fill_value")
        fill = np.nan if fill is None else fill
        self.set_labels(idx, x.sel)
        out = e.outvars[0]
        shape, dt = tuple(out.aval.shape), out.aval.dtype
        del view

        def f(E):
            zy = E.stat("zy", x.sel)
            _, valid, _ = self.labels(E, idx, zy.shape[:-1])
            valid = valid[..., None]
            lp = _one(x.a)(E) * zy + (x.b(E) if x.b is not None else 0)
            if mode == "FILL_OR_DROP":
                lp = jnp.where(valid, lp, jnp.asarray(fill, lp.dtype))
            elif mode == "PROMISE_IN_BOUNDS":  # XLA clamps the read; the scatter drops the cotangent
                lp = jnp.where(valid, lp, lax.stop_gradient(lp))
            return lp.reshape(shape).astype(dt)
        return f
