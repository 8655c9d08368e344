"""Cross-entropy in any spelling: the logits' uses as arithmetic on per-row statistics.

Rooted at an output projection ``z = h @ W`` (``W`` as [d, V] or [V, d]; then bias adds,
vocabulary masks ``where(mask_v, z, fill)`` and casts), the rule walks forward over every
[rows, V] value computed from ``z`` and gives each a normal form:

- ``aff``: ``a·z[sel] + b`` (``a``, ``b`` per-row values, ``sel`` the row slices and
  reshapes applied since the dot: a shift written after the projection);
- ``exp``: ``exp(z[sel] + b)``; ``row``: a per-row value broadcast over the vocabulary;
- ``lab``: ``α·one_hot(y) + β`` (one-hot targets, label smoothing); ``prod``: lab · aff.

Reductions over the vocabulary then become arithmetic on :func:`vocab_stats`
(``max``, ``logsumexp``, ``z[y]``, ``Σz``): ``reduce_max(z + b) = m + b``,
``Σ exp(z + b) = exp(lse + b)``, ``Σ (a·z + b) = a·Σz + V·b``, ``take_along_axis(a·z + b, y)
= a·z[y] + b``, ``Σ one_hot(y)·(a·z + b) = a·z[y] + b``. Per-row equations between those
reductions and later [rows, V] values (``log_softmax``'s ``log Σ``) are replayed as they
are. So ``log_softmax`` + ``take_along_axis`` / one-hot, ``logsumexp(z) − z[y]`` (optax's
integer-label loss), ``optax.softmax_cross_entropy`` with one-hot or smoothed labels and
shifted logits all reach the same kernel; what follows per row (masked means, z-loss
``lse²``) stays in the program. A [rows, V] operation outside the forms, or a [rows, V]
value read outside the loss (the backward of a post-AD jaxpr, ``argmax`` for accuracy),
leaves the candidate unfused with that reason in the report.
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.patterns import Match, Rule, View

from .xent_forms import (Aff, Env, Exp, Lab, Prod, Refuse, Row, _add, _apply_sel,
                         _combine, _neg, _one, _reshape_op, _scale, _scale_b, _slice_op, reaches_softmax)
from .xent_kernel import vocab_stats
from .xent_labels import LabelReads


class XentRegionRule(Rule):
    def __init__(self):
        super().__init__("fuse.cross_entropy", roots=("dot_general",))

    def find(self, view: View, i: int) -> Match | None:
        from .fuse_xent import POST_AD_HINT, note
        d = view.eqns[i]
        proj = _projection(view, i)
        if proj is None or not jnp.issubdtype(d.outvars[0].aval.dtype, jnp.floating):
            return None
        h, w, w_vd = proj[:3]
        v = int(w.aval.shape[0 if w_vd else 1])
        n_tok = int(np.prod(h.aval.shape[:-1]))
        chunk = view.option("xent_chunk", None)
        if chunk is None:
            chunk = max(128, (view.option("xent_chunk_bytes", 16 << 20) // (4 * max(n_tok, 1))) // 128 * 128)
        chunk = int(min(chunk, v))
        if 4 * n_tok * v < view.option("xent_min_bytes", 32 << 20) or v < 2 * chunk:
            return None  # logits small enough that chunking would only cost time
        m = _Region(view, i, v, chunk, proj)
        try:
            found = m.run()
        except Refuse as why:
            if not (m.candidate or reaches_softmax(view, m.z, m.is_v)):
                return None  # never reached a softmax / label read: a plain dense layer, say nothing
            post = "; " + POST_AD_HINT if getattr(view.ctx, "placement", "") == "post-AD" else ""
            note(view, i, self.name, f"not applied: {why}{post}")
            return None
        return found


def _projection(view, i):
    """``(h, w, w_vd, z, transpose)`` of an output projection rooted at equation ``i``:
    ``h @ W`` with ``W`` as [d, V] or [V, d], or ``W[V, d] · h`` giving [V, ...] and a
    transpose putting V last (equinox's Linear under vmap); else None."""
    d = view.eqns[i]
    a, b = d.invars
    (lc, rc), (lb, rb) = d.params["dimension_numbers"]
    if lb or rb:
        return None
    if b.aval.ndim == 2 and a.aval.ndim >= 2 and tuple(lc) == (a.aval.ndim - 1,):
        return a, b, tuple(rc) == (1,), d.outvars[0], None
    n = b.aval.ndim
    if a.aval.ndim == 2 and n >= 2 and tuple(lc) == (1,) and tuple(rc) == (n - 1,):
        us = view.users.get(d.outvars[0], [])
        t = view.eqns[us[0]] if len(us) == 1 and d.outvars[0] not in view.outputs else None
        if (t is not None and t.primitive.name == "transpose"
                and tuple(t.params["permutation"]) == tuple(range(1, n)) + (0,)):
            return b, a, True, t.outvars[0], us[0]
    return None


class _Region(LabelReads):
    def __init__(self, view, i, v, chunk, proj):
        self.view, self.i, self.v, self.chunk = view, i, v, chunk
        self.h, self.w, self.w_vd, self.z0, extra = proj
        self.forms, self.rowfun = {}, {}
        self.eqns = {i} if extra is None else {i, extra}
        self.vregion, self.rowcand, self.labeqns = set(), set(), set()
        self.outside = {}
        self.zy_key = None
        self.chain, self.vecs = [], []
        self.z = self.z0
        self.candidate = False   # set once a softmax, logsumexp or label read is seen

    # -------------------------------------------------------------- helpers
    def is_v(self, a):
        return ir.is_var(a) and a.aval.ndim >= 1 and a.aval.shape[-1] == self.v

    def ref(self, atom):
        if ir.is_literal(atom):
            val = ir.literal_value(atom)
            return lambda E: val
        if atom not in self.rowfun and atom not in self.forms:
            self.outside[atom] = None
        return lambda E: E.get(atom)

    def vocab_vector(self, atom):
        """A [.., V] operand that varies only along the vocabulary: its [V] source or None."""
        # [V] broadcast or reshaped with the vocabulary as the last axis, possibly in steps
        # ([V] -> [1, V] -> [1, 1, V]: flax nnx and equinox add their bias so, broadcast by
        # the add itself)
        cur = atom
        while True:
            e = self.view.producer_eqn(cur)
            if e is None or e.primitive.name not in ("broadcast_in_dim", "reshape"):
                return None
            x, out = e.invars[0], cur.aval.shape
            if not ir.is_var(x) or not x.aval.shape or x.aval.shape[-1] != self.v:
                return None
            if any(n != 1 for n in x.aval.shape[:-1]):
                return None
            if e.primitive.name == "broadcast_in_dim":
                if tuple(e.params["broadcast_dimensions"])[-1] != len(out) - 1:
                    return None
            elif out != (1,) * (len(out) - 1) + (self.v,):
                return None
            if x.aval.shape == (self.v,):
                return x, self.view.producer[atom]
            cur = x

    def follow_chain(self, cur):
        view = self.view
        while True:
            us = view.users.get(cur, [])
            if len(us) != 1 or cur in view.outputs:
                return cur
            k = us[0]
            e = view.eqns[k]
            name = e.primitive.name
            if name == "convert_element_type" and jnp.issubdtype(e.params["new_dtype"], jnp.floating):
                self.chain.append(("cast", np.dtype(e.params["new_dtype"])))
            elif name == "add":
                other = e.invars[1] if e.invars[0] is cur else e.invars[0]
                got = self.vocab_vector(other) if ir.is_var(other) else None
                if got is None:
                    return cur
                self.chain.append(("bias", len(self.vecs)))
                self.vecs.append(got[0])
            elif name == "select_n" and len(e.invars) == 3 and e.invars[0] is not cur:
                got = self.vocab_vector(e.invars[0])
                keep1 = e.invars[2] is cur
                fill = self.view.scalar_value(e.invars[1] if keep1 else e.invars[2])
                if got is None or fill is None or got[0].aval.dtype != np.bool_:
                    return cur
                self.chain.append(("mask", len(self.vecs), float(fill), keep1))
                self.vecs.append(got[0])
            else:
                return cur
            self.eqns.add(k)
            cur = e.outvars[0]

    def form_of(self, a):
        if ir.is_var(a) and a in self.forms:
            return self.forms[a]
        if not self.is_v(a) or (ir.is_var(a) and a.aval.ndim and a.aval.shape[-1] == 1):
            return Row(self.ref(a))
        e = self.view.producer_eqn(a)
        if e is not None and e.primitive.name == "broadcast_in_dim":
            return self.bcast_row(e, a)
        lab = self.label(a)
        if lab is not None:
            return lab
        raise Refuse(f"a [rows, {self.v}] operand ({e.primitive.name if e else 'input'}) that is "
                      "neither one_hot(labels) nor a per-row value (dense targets)")

    def bcast_row(self, e, out):
        x = e.invars[0]
        bd = tuple(e.params["broadcast_dimensions"])
        nd = out.aval.ndim
        if nd - 1 in bd and x.aval.shape[bd.index(nd - 1)] != 1:
            raise Refuse("a broadcast varying along the vocabulary is applied to the logits")
        f = self.ref(x)
        kshape = tuple(out.aval.shape[:-1]) + (1,)
        return Row(lambda E: lax.broadcast_in_dim(E.get(x) if ir.is_var(x) else f(E), kshape, bd))

    # -------------------------------------------------------------- forms
    def v_op(self, k, e):
        name = e.primitive.name
        out = e.outvars[0]
        ins = [self.form_of(a) for a in e.invars]
        if name == "convert_element_type":
            if not jnp.issubdtype(e.params["new_dtype"], jnp.floating):
                raise Refuse(f"the logits cast to {e.params['new_dtype']}")
            return ins[0]
        if name in ("add", "sub"):
            x, y = ins
            sgn = (lambda f: f) if name == "add" else _neg
            if isinstance(x, Aff) and isinstance(y, Row):
                return Aff(x.a, _add(x.b, sgn(y.f)), x.sel)
            if isinstance(x, Row) and isinstance(y, Aff):
                return Aff(_one(y.a) if name == "add" else _neg(_one(y.a)), _add(x.f, sgn(y.b)), y.sel)
            if isinstance(x, Aff) and isinstance(y, Aff) and x.sel == y.sel:
                return Aff(_add(_one(x.a), sgn(_one(y.a))), _add(x.b, sgn(y.b)), x.sel)
            if isinstance(x, Row) and isinstance(y, Row):
                return Row(_combine(x.f, y.f, jnp.add if name == "add" else jnp.subtract))
        elif name == "neg":
            x, = ins
            if isinstance(x, Aff):
                return Aff(_neg(_one(x.a)), _neg(x.b), x.sel)
        elif name in ("mul", "div"):
            x, y = ins
            if name == "mul" and isinstance(x, Row) and not isinstance(y, Row):
                x, y = y, x
            op = jnp.multiply if name == "mul" else jnp.divide
            if isinstance(x, Aff) and isinstance(y, Row):
                return Aff(_scale(x.a, y.f, op), _scale_b(x.b, y.f, op), x.sel)
            if name == "mul" and isinstance(x, Lab) and isinstance(y, Aff):
                self.candidate = True
                return Prod(x, y)
            if name == "mul" and isinstance(x, Aff) and isinstance(y, Lab):
                return Prod(y, x)
        elif name == "exp":
            x, = ins
            if isinstance(x, Aff) and x.a is None:
                self.candidate = True
                return Exp(x.b, x.sel)
        elif name in ("slice", "reshape") and isinstance(ins[0], (Aff, Exp)) and self.is_v(out):
            if name == "reshape" and (e.params.get("dimensions") is not None or len(e.invars) != 1):
                raise Refuse("a transposing reshape of the logits")
            if name == "slice" and (e.params["start_indices"][-1] != 0 or e.params["limit_indices"][-1] != self.v
                                    or (e.params["strides"] or (1,))[-1] != 1):
                raise Refuse("a slice of the vocabulary axis")
            op = _slice_op(e) if name == "slice" else _reshape_op(e)
            x = ins[0]
            def wrap(f):
                return None if f is None else (lambda E: (lambda t: op[0](t) if jnp.ndim(t) else t)(f(E)))
            if isinstance(x, Aff):
                return Aff(wrap(x.a), wrap(x.b), x.sel + (op,))
            return Exp(wrap(x.b), x.sel + (op,))
        elif name == "broadcast_in_dim" and isinstance(ins[0], Row):
            return self.bcast_row(e, out)
        elif name == "stop_gradient" and isinstance(ins[0], Row):
            f = ins[0].f
            return Row(lambda E: lax.stop_gradient(f(E)))
        raise Refuse(f"{name} on a [rows, {self.v}] value computed from the logits is not part of "
                      "a cross-entropy the kernel computes")

    def exit(self, k, e):
        """A reduction over the vocabulary: fn(E) for its per-row result."""
        name = e.primitive.name
        out = e.outvars[0]
        x = self.form_of(e.invars[0])
        nd = e.invars[0].aval.ndim
        if name in ("reduce_max", "reduce_sum"):
            axes = tuple(e.params["axes"])
            if nd - 1 not in axes:
                raise Refuse(f"{name} over the tokens of a [rows, V] value")
            others = tuple(a for a in axes if a != nd - 1)
            if name == "reduce_max":
                if others or not isinstance(x, Aff) or x.a is not None:
                    raise Refuse("reduce_max of a scaled or partly reduced logits value")
                f = self.stat_fn("m", x)
            elif isinstance(x, Exp):
                b = x.b or (lambda E: 0)
                f = lambda E, x=x, b=b: jnp.exp(E.stat("lse", x.sel) + b(E))
            elif isinstance(x, Aff):
                f = self.affine_sum(x)
            elif isinstance(x, Prod):
                f = self.onehot_sum(x)
            else:
                raise Refuse(f"reduce_sum of a {type(x).__name__} form")
            shape, dt = tuple(out.aval.shape), out.aval.dtype
            return lambda E: jnp.sum(f(E), axis=others, keepdims=True).reshape(shape).astype(dt)
        if name == "gather":
            self.candidate = True
            return self.gather(e, x)
        raise Refuse(f"{name} reads the logits")

    def stat_fn(self, k, x, b=None):
        a, bb = x.a, x.b if b is None else b
        return lambda E: _one(a)(E) * E.stat(k, x.sel) + (bb(E) if bb is not None else 0)

    def affine_sum(self, x):
        a, b, v = x.a, x.b, self.v
        return lambda E: (_one(a)(E) * E.stat("zsum", x.sel)
                          + (v * jnp.broadcast_to(b(E), E.stat("zsum", x.sel).shape) if b is not None else 0))

    def compute_stats(self, E):
        d = self.view.eqns[self.i]
        h, w = E.get(self.h), E.get(self.w)
        base = tuple(self.z0.aval.shape[:-1])
        if self.zy_key is not None:
            _, y, sel = self.zy_key
            use_rows = _apply_sel(jnp.zeros(base + (1,)), sel).shape[:-1]
            lab = self.labels(E, y, use_rows)[2]
            for op in reversed(sel):
                lab = op[1](lab)
        else:
            lab = jnp.zeros(base, jnp.int32)
        pet = d.params.get("preferred_element_type")
        zdt = np.dtype(pet) if pet is not None else np.dtype(d.outvars[0].aval.dtype)
        zfinal = self.z.aval.dtype
        outs = vocab_stats(h, w, lab, chunk=self.chunk, w_vd=self.w_vd, chain=tuple(self.chain),
                           vecs=tuple(E.get(a) for a in self.vecs), zdt=zdt, acc=zfinal,
                           precision=d.params.get("precision"))
        return [o[..., None] for o in outs]

    # -------------------------------------------------------------- the walk
    def run(self):
        z = self.follow_chain(self.z0)
        self.z = z
        self.forms[z] = Aff(None, None, ())
        self._walk()
        sand = self._sandwiched()
        mine = self.eqns | self.vregion | sand
        self._check_no_outside_reads(mine)
        mine |= self._own_label_eqns(mine)
        return self._match(mine, sand)

    def _walk(self):
        """Forward over the equations after the dot: forms of [rows, V] values, exits
        (vocabulary reductions) and per-row candidates."""
        view = self.view
        exits = set()
        for k in range(self.i + 1, len(view.eqns)):
            if k in self.eqns:
                continue
            e = view.eqns[k]
            ins = [a for a in e.invars if ir.is_var(a) and (a in self.forms or a in self.rowfun)]
            if not ins:
                continue
            vin = any(a in self.forms for a in ins)
            if ir.has_subjaxprs(e) or len(e.outvars) != 1 or ir.impure(e):
                if vin:
                    raise Refuse(f"{e.primitive.name} reads a [rows, {self.v}] value computed from the logits")
                continue
            out = e.outvars[0]
            if self.is_v(out):
                self.forms[out] = self.v_op(k, e)
                self.vregion.add(k)
            elif vin:
                self.rowfun[out] = self.exit(k, e)
                self.vregion.add(k)
                exits.add(k)
            elif ir.is_var(out) and not ir.is_dropvar(out):
                self.rowfun[out] = (lambda e: lambda E: ir.bind_eqn(e, [E.get(a) for a in e.invars])[0])(e)
                self.rowcand.add(k)
        if not exits:
            raise Refuse("no reduction over the vocabulary reads the logits")

    def _sandwiched(self) -> set:
        """Per-row equations between two vocabulary reductions: replayed inside."""
        view = self.view
        sand, stack = set(), [a for k in self.vregion for a in view.eqns[k].invars]
        while stack:
            a = stack.pop()
            k = view.producer.get(a) if ir.is_var(a) else None
            if k is None or k not in self.rowcand or k in sand:
                continue
            sand.add(k)
            stack.extend(view.eqns[k].invars)
        for k in self.rowcand - sand:
            self.rowfun.pop(view.eqns[k].outvars[0], None)
        for k in sand:
            for a in view.eqns[k].invars:
                self.ref(a)
        return sand

    def _check_no_outside_reads(self, mine: set) -> None:
        view = self.view
        for k in sorted(mine):
            for o in view.eqns[k].outvars:
                if not (ir.is_var(o) and self.is_v(o)):
                    continue
                users = sorted({view.eqns[u].primitive.name for u in view.users.get(o, ()) if u not in mine})
                if users or o in view.outputs:
                    raise Refuse(f"a [rows, {self.v}] value ({view.eqns[k].primitive.name}) is also read by "
                                  f"{', '.join(users) or 'the program output'} outside the loss")

    def _own_label_eqns(self, mine: set) -> set:
        """One-hot targets built here go too, where nothing else reads them."""
        view = self.view
        lab = set(self.labeqns)
        changed = True
        while changed:
            changed = False
            for k in list(lab):
                o = view.eqns[k].outvars[0]
                if o in view.outputs or any(u not in mine | lab for u in view.users.get(o, ())):
                    lab.discard(k)
                    changed = True
        return lab

    def _match(self, mine: set, sand: set) -> Match:
        view = self.view
        produced = {o for k in mine for o in view.eqns[k].outvars if ir.is_var(o)}
        for a in list(self.outside):
            if a in produced:
                del self.outside[a]
            elif view.depends_on(a, produced):
                raise Refuse("a value the loss reads depends on the loss itself")
        outs = [o for k in sorted(self.vregion | sand) for o in view.eqns[k].outvars
                if ir.is_var(o) and not self.is_v(o)
                and (o in view.outputs or any(u not in mine for u in view.users.get(o, ())))]
        args = list(dict.fromkeys([self.h, self.w, *self.vecs, *self.outside]))
        args = [a for a in args if ir.is_var(a)]
        lits = [a for a in [self.h, self.w] if not ir.is_var(a)]
        if lits:
            raise Refuse("literal operands of the projection")

        def fused(*vals):
            E = Env(self, dict(zip(args, vals)))
            return [E.get(o) for o in outs]
        return Match("fuse.cross_entropy", frozenset(mine), outs, fused, args)

RULES = [XentRegionRule()]
__all__ = ["XentRegionRule", "RULES"]
