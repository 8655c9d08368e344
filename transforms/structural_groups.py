"""Dependency groups for structural pruning, read off the jaxpr of ``apply(params, x)``.

Every axis of every value is made of *atoms* (a union-find over dimensions): an
elementwise op, a bias add, a batch dim of a dot or the output feature of a conv ties
its operands' atoms to its result's; a reshape that merges or splits axes (heads:
``[d, H*Dh] -> [B, T, H, Dh]``) splits an atom into factor atoms. After the walk, the
atoms that appear in some parameter axis are the candidate groups; a group is prunable
only if it never reaches the function's inputs or outputs, is never reduced or handled by
a primitive without a rule (the default rule refuses), and disappears only by being
contracted against a weight. Refusals keep the first reason, which names the primitive.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

import numpy as np

from graphopt import ir

# ----------------------------------------------------------------------------- atoms


class Atoms:
    """Union-find over dimensions, where a dimension may split into factor dimensions."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.split: dict[int, list[int]] = {}  # factors (row-major), from reshapes
        self.cat: dict[int, list[int]] = {}    # pieces (concatenated), from concatenate/split
        self.refused: dict[int, str] = {}
        self.io: dict[int, str] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def leaves(self, a: int) -> list[int]:
        """The unsplit root atoms whose sizes multiply to ``a``'s size (row-major order)."""
        r = self.find(a)
        if r not in self.split:
            return [r]
        return [leaf for c in self.split[r] for leaf in self.leaves(c)]

    def all_leaves(self, a: int) -> list[int]:
        """Leaves, with concatenated atoms opened into their pieces' leaves too."""
        out = []
        for leaf in self.leaves(a):
            out.append(leaf)
            for p in self.cat.get(leaf, ()):
                out += self.all_leaves(p)
        return out

    def _children(self, r: int, sizes) -> list[int]:
        kids = [self.new(s) for s in sizes]
        for k in kids:  # refusals and I/O contact hold for every factor or piece
            if r in self.refused:
                self.refused[k] = self.refused[r]
            if r in self.io:
                self.io[k] = self.io[r]
        return kids

    def _split(self, r: int, first: int) -> None:
        self.split[r] = self._children(r, [first, self.size[r] // first])

    def _merge(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        ca, cb = self.cat.get(a), self.cat.get(b)
        if ca is not None and cb is None:
            cb = self.cat[b] = self._children(b, [self.size[p] for p in ca])
        elif cb is not None and ca is None:
            ca = self.cat[a] = self._children(a, [self.size[p] for p in cb])
        self.parent[b] = a
        for table in (self.refused, self.io):
            if a not in table and b in table:
                table[a] = table[b]
        if ca is not None:
            if [self.size[p] for p in ca] != [self.size[p] for p in cb]:
                self.mark([a], "concatenate/split pieces do not line up")
            else:
                for pa, pb in zip(ca, cb):
                    self.unify([pa], [pb], "concatenate/split")

    def mark(self, atoms, reason: str, table: str = "refused") -> None:
        tab = getattr(self, table)
        for a in atoms:
            for leaf in self.all_leaves(a):
                tab.setdefault(leaf, reason)

    def groups_under(self, a: int) -> list[int]:
        """The atoms that can be groups inside axis atom ``a`` (concatenations opened)."""
        out = []
        for leaf in self.leaves(a):
            if leaf in self.cat:
                out += [g for p in self.cat[leaf] for g in self.groups_under(p)]
            else:
                out.append(leaf)
        return out

    def index(self, a: int, kept: dict) -> np.ndarray:
        """Positions along axis atom ``a`` that stay when groups keep ``kept[group]``."""
        r = self.find(a)
        if r in self.split:
            idx = np.zeros((1,), np.int64)
            for c in self.split[r]:
                idx = (idx[:, None] * self.size[self.find(c)] + self.index(c, kept)[None, :]).ravel()
            return idx
        if r in self.cat:
            offs = np.cumsum([0] + [self.size[p] for p in self.cat[r]])
            return np.concatenate([self.index(p, kept) + o for p, o in zip(self.cat[r], offs)])
        return np.asarray(kept[r], np.int64) if r in kept else np.arange(self.size[r])

    def unify(self, xs: list[int], ys: list[int], why: str) -> None:
        """Tie two axis-atom sequences of equal total size (splitting atoms to align them)."""
        qx, qy = collections.deque(xs), collections.deque(ys)
        while True:
            a = self._pop(qx)
            b = self._pop(qy)
            if a is None or b is None:
                if a is not None or b is not None:
                    self.mark([x for x in (a, b) if x is not None] + list(qx) + list(qy), why)
                return
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self._merge(a, b)
            elif a in self.cat or b in self.cat:  # a reshape across concatenated pieces
                self.mark([a, b, *qx, *qy], "reshape across concatenated pieces")
                return
            elif sb % sa == 0:
                self._split(b, sa)
                qx.appendleft(a)
                qy.appendleft(b)
            elif sa % sb == 0:
                self._split(a, sb)
                qx.appendleft(a)
                qy.appendleft(b)
            else:  # a reshape that mixes two dimensions (e.g. 6 -> 4 x ...): cannot follow
                self.mark([a, b, *qx, *qy], why)
                return

    def _pop(self, q):
        while q:
            r = self.find(q.popleft())
            if r in self.split:
                q.extendleft(reversed(self.split[r]))
            elif self.size[r] != 1:
                return r
        return None


# ----------------------------------------------------------------------------- walking the jaxpr


@dataclasses.dataclass
class Walk:
    atoms: Atoms
    axes: dict  # (ctx, id(var)) -> [atom per axis]
    param_of: dict  # (ctx, id(var)) -> param leaf index, for vars that are a param (reshaped/cast)
    consumed: dict  # param leaf index -> atoms contracted against it
    keep: list  # vars referenced by id in the keys above
    ctx: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))
    calls: dict = dataclasses.field(default_factory=dict)  # (ctx, id(eqn)) -> the body's ctx

    def of(self, ctx, v):
        if ir.is_literal(v):
            return [self.atoms.new(d) for d in getattr(v.aval, "shape", ())]
        key = (ctx, id(v))
        if key not in self.axes:
            self.keep.append(v)
            self.axes[key] = [self.atoms.new(d) for d in getattr(v.aval, "shape", ())]
        return self.axes[key]

    def fresh(self, ctx, v):
        return self.of(ctx, v)


def _shape(v):
    return tuple(getattr(v.aval, "shape", ()))


def _elementwise(w, ctx, eqn):
    out = w.fresh(ctx, eqn.outvars[0])
    shape = _shape(eqn.outvars[0])
    for v in eqn.invars:
        s = _shape(v)
        if len(s) != len(shape):
            continue  # scalar operands
        for a, o in zip(w.of(ctx, v), out):
            if w.atoms.size[a] == w.atoms.size[o]:  # size-1 axes broadcast
                w.atoms.unify([a], [o], ir.prim_name(eqn))
    _pass_param(w, ctx, eqn)


def _pass_param(w, ctx, eqn):
    # a cast/reshape/transpose of a weight still is that weight (for consumer detection)
    if ir.prim_name(eqn) in _VIEW and ir.is_var(eqn.invars[0]):
        leaf = w.param_of.get((ctx, id(eqn.invars[0])))
        if leaf is not None:
            w.param_of[(ctx, id(eqn.outvars[0]))] = leaf


def _broadcast_in_dim(w, ctx, eqn):
    out = w.fresh(ctx, eqn.outvars[0])
    ins = w.of(ctx, eqn.invars[0])
    for a, d in zip(ins, eqn.params["broadcast_dimensions"]):
        if w.atoms.size[a] == w.atoms.size[out[d]]:
            w.atoms.unify([a], [out[d]], "broadcast_in_dim")
    _pass_param(w, ctx, eqn)


def _reshape(w, ctx, eqn):
    if eqn.params.get("dimensions") is not None:
        return _refuse(w, ctx, eqn)
    w.atoms.unify(list(w.of(ctx, eqn.invars[0])), list(w.fresh(ctx, eqn.outvars[0])),
                  "reshape mixes this axis with another")
    _pass_param(w, ctx, eqn)


def _transpose(w, ctx, eqn):
    ins, out = w.of(ctx, eqn.invars[0]), w.fresh(ctx, eqn.outvars[0])
    for i, p in enumerate(eqn.params["permutation"]):
        w.atoms.unify([ins[p]], [out[i]], "transpose")
    _pass_param(w, ctx, eqn)


def _squeeze(w, ctx, eqn):
    ins, out = w.of(ctx, eqn.invars[0]), w.fresh(ctx, eqn.outvars[0])
    kept = [a for i, a in enumerate(ins) if i not in set(eqn.params["dimensions"])]
    w.atoms.unify(kept, list(out), "squeeze")


def _reduce(w, ctx, eqn):
    axes = set(eqn.params["axes"])
    ins, out = w.of(ctx, eqn.invars[0]), w.fresh(ctx, eqn.outvars[0])
    w.atoms.mark([ins[i] for i in axes], f"reduced over by {ir.prim_name(eqn)}")
    w.atoms.unify([a for i, a in enumerate(ins) if i not in axes], list(out), ir.prim_name(eqn))


def _contract(w, ctx, eqn, pairs, what):
    """Tie contracted operand axes; note which weight consumes them (or refuse)."""
    lv, rv = eqn.invars[:2]
    leaves = [w.param_of.get((ctx, id(v))) if ir.is_var(v) else None for v in (lv, rv)]
    for a, b in pairs:
        w.atoms.unify([a], [b], what)
        for leaf, atom in zip(leaves, (a, b)):
            if leaf is not None:
                w.consumed[leaf].append(atom)
        if leaves == [None, None]:  # e.g. q.k: the size of this axis sets a softmax scale
            w.atoms.mark([a], f"contracted between two activations by {what}")


def _dot_general(w, ctx, eqn):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = w.of(ctx, eqn.invars[0]), w.of(ctx, eqn.invars[1])
    out = w.fresh(ctx, eqn.outvars[0])
    _contract(w, ctx, eqn, [(lhs[i], rhs[j]) for i, j in zip(lc, rc)], "dot_general")
    lfree = [a for i, a in enumerate(lhs) if i not in set(lc) | set(lb)]
    rfree = [a for i, a in enumerate(rhs) if i not in set(rc) | set(rb)]
    batch = [lhs[i] for i in lb]
    for i, j in zip(lb, rb):
        w.atoms.unify([lhs[i]], [rhs[j]], "dot_general batch")
    w.atoms.unify(batch + lfree + rfree, list(out), "dot_general")


def _conv(w, ctx, eqn):
    p = eqn.params
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        return _refuse(w, ctx, eqn, "grouped/depthwise conv_general_dilated")
    dn = p["dimension_numbers"]
    lhs, rhs = w.of(ctx, eqn.invars[0]), w.of(ctx, eqn.invars[1])
    out = w.fresh(ctx, eqn.outvars[0])
    (lb, lf, *lsp), (ro, ri, *rsp), (ob, of, *osp) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    _contract(w, ctx, eqn, [(lhs[lf], rhs[ri])], "conv_general_dilated")
    w.atoms.unify([lhs[lb]], [out[ob]], "conv batch")
    w.atoms.unify([rhs[ro]], [out[of]], "conv output features")
    w.atoms.mark([lhs[i] for i in lsp] + [rhs[i] for i in rsp] + [out[i] for i in osp],
                 "spatial axis of conv_general_dilated")


def _concatenate(w, ctx, eqn):
    d = eqn.params["dimension"]
    out = w.fresh(ctx, eqn.outvars[0])
    ins = [w.of(ctx, v) for v in eqn.invars]
    for a in ins:
        w.atoms.unify([x for i, x in enumerate(a) if i != d], [x for i, x in enumerate(out) if i != d],
                      "concatenate")
    piece = w.atoms.new(w.atoms.size[out[d]])
    w.atoms.cat[piece] = [a[d] for a in ins]
    w.atoms.unify([piece], [out[d]], "concatenate")


def _split_rule(w, ctx, eqn):
    d = eqn.params["axis"]
    ins = w.of(ctx, eqn.invars[0])
    outs = [w.fresh(ctx, v) for v in eqn.outvars]
    for o in outs:
        w.atoms.unify([x for i, x in enumerate(ins) if i != d], [x for i, x in enumerate(o) if i != d], "split")
    piece = w.atoms.new(w.atoms.size[ins[d]])
    w.atoms.cat[piece] = [o[d] for o in outs]
    w.atoms.unify([piece], [ins[d]], "split")


def _call(w, ctx, eqn):
    """pjit / custom_jvp_call / custom_vjp_call / checkpoint: follow into the body."""
    subs = list(ir.subjaxpr_params(eqn))
    sub = subs[0][2] if len(subs) == 1 else None
    inner = getattr(sub, "jaxpr", sub)
    ok = (inner is not None and len(inner.invars) == len(eqn.invars)
          and len(inner.outvars) == len(eqn.outvars)
          and all(_shape(a) == _shape(b) for a, b in zip(inner.invars, eqn.invars))
          and all(_shape(a) == _shape(b) for a, b in zip(inner.outvars, eqn.outvars)))
    if not ok:
        return _refuse(w, ctx, eqn)
    c = next(w.ctx)
    w.calls[(ctx, id(eqn))] = c
    w.keep.append(eqn)
    for v in inner.constvars:
        w.atoms.mark(w.of(c, v), "closed-over constant")
    for iv, ov in zip(inner.invars, eqn.invars):
        w.atoms.unify(list(w.of(c, iv)), list(w.of(ctx, ov)), ir.prim_name(eqn))
        if ir.is_var(ov) and (ctx, id(ov)) in w.param_of:
            w.param_of[(c, id(iv))] = w.param_of[(ctx, id(ov))]
    walk_eqns(w, c, inner.eqns)
    for iv, ov in zip(inner.outvars, eqn.outvars):
        w.atoms.unify(list(w.of(c, iv)), list(w.fresh(ctx, ov)), ir.prim_name(eqn))


def _refuse(w, ctx, eqn, why=None):
    why = why or f"{ir.prim_name(eqn)} has no structural-pruning rule"
    for v in eqn.invars:
        if ir.is_var(v):
            w.atoms.mark(w.of(ctx, v), why)
    for v in eqn.outvars:
        w.atoms.mark(w.fresh(ctx, v), why)


_VIEW = {"convert_element_type", "reshape", "transpose", "copy", "copy_p", "broadcast_in_dim"}
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "rsqrt", "sqrt", "abs", "sign", "square", "integer_pow", "pow", "erf",
    "erf_inv", "sin", "cos", "select_n", "clamp", "convert_element_type", "copy", "copy_p",
    "stop_gradient", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "is_finite",
    "reduce_precision", "floor", "ceil", "round", "nextafter", "add_any", "cbrt", "atan2",
}
RULES = {
    **{name: _elementwise for name in _ELEMENTWISE},
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "concatenate": _concatenate,
    "split": _split_rule,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                  "argmax", "argmin", "reduce_and", "reduce_or")},
    **{name: _call for name in ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                                "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint",
                                "remat2")},
}


def walk_eqns(w: Walk, ctx: int, eqns) -> None:
    for eqn in eqns:
        RULES.get(ir.prim_name(eqn), _refuse)(w, ctx, eqn)


# ----------------------------------------------------------------------------- groups


@dataclasses.dataclass
class Member:
    leaf: int        # index into the flattened params
    path: str        # the weight's pytree path
    axis: int
    consumer: bool   # contracted against this weight (its input side)


@dataclasses.dataclass
class Group:
    atom: int
    size: int
    members: list
    reason: str | None = None  # why it cannot be pruned (None: prunable)

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def name(self) -> str:
        m = self.members[0]
        return f"{m.path}[axis {m.axis}]"


@dataclasses.dataclass
class Analysis:
    atoms: Atoms
    groups: list          # Group, prunable or not, in order of first appearance
    param_axes: list      # per leaf: per axis: its atom (split into factors/pieces in ``atoms``)
    walk: Walk = None     # atoms of every value, for replaying the jaxpr at the new shapes
    jaxpr: object = None


def analyze(closed_jaxpr, n_params: int, paths: list[str]) -> Analysis:
    """Groups of the params (the first ``n_params`` inputs of ``closed_jaxpr``)."""
    jaxpr = closed_jaxpr.jaxpr
    w = Walk(Atoms(), {}, {}, collections.defaultdict(list), [])
    for v in jaxpr.constvars:
        w.atoms.mark(w.of(0, v), "closed-over constant")
    for i, v in enumerate(jaxpr.invars):
        if i < n_params:
            w.param_of[(0, id(v))] = i
        else:
            w.atoms.mark(w.of(0, v), "reaches the function's input", "io")
    walk_eqns(w, 0, jaxpr.eqns)
    for v in jaxpr.outvars:
        if ir.is_var(v):
            w.atoms.mark(w.of(0, v), "reaches the function's output", "io")
    at = w.atoms
    consumed = {leaf: {at.find(x) for a in atoms for x in at.groups_under(a)}
                for leaf, atoms in w.consumed.items()}
    param_axes, groups = [], {}
    for i, v in enumerate(jaxpr.invars[:n_params]):
        axes = [at.find(a) for a in w.of(0, v)]
        param_axes.append(axes)
        for k, a in enumerate(axes):
            for r in dict.fromkeys(at.groups_under(a)):
                if at.size[r] == 1:
                    continue  # nothing to prune in a size-1 axis
                g = groups.setdefault(r, Group(r, at.size[r], []))
                g.members.append(Member(i, paths[i], k, r in consumed.get(i, ())))
    for g in groups.values():
        if g.atom in at.io:
            g.reason = at.io[g.atom]
        elif g.atom in at.refused:
            g.reason = at.refused[g.atom]
        elif not any(m.consumer for m in g.members):
            g.reason = "never contracted against a weight (nothing reads it)"
    return Analysis(at, list(groups.values()), param_axes, w, closed_jaxpr)


def axis_index(analysis: Analysis, leaf: int, axis: int, kept: dict) -> np.ndarray | None:
    """Indices to keep along ``axis`` of param ``leaf`` (None: untouched)."""
    a = analysis.param_axes[leaf][axis]
    if not any(analysis.atoms.find(g) in kept for g in analysis.atoms.groups_under(a)):
        return None
    return analysis.atoms.index(a, kept)


def channel_view(analysis: Analysis, leaf: int, axis: int, atom: int, x):
    """``x`` (shaped like param ``leaf``) as [channels of ``atom``, everything else]."""
    n = analysis.atoms.size[atom]
    pos = np.stack([analysis.atoms.index(analysis.param_axes[leaf][axis], {atom: [c]}) for c in range(n)])
    return np.moveaxis(np.asarray(x), axis, 0)[pos].reshape(n, -1)  # numpy: no compile per shape
