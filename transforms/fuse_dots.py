"""Dot fusions: parallel dots sharing an input, and cheapest association of matmul chains.

``parallel``: ``x @ w1, x @ w2, ...`` (Q/K/V projections, gate and up projections) with
the same dimension numbers become one ``x @ concat(w1, w2, ...)`` sliced after.
Identity: column blocks of a product are products with column blocks,
``x @ [w1 | w2] = [x @ w1 | x @ w2]``. Fires only where the cost model says it pays:
reading x once instead of k times must save more bytes than concatenating the weights
costs (``(k-1)·bytes(x) >= 2·Σ bytes(w)``; option ``parallel_dots="always"`` forces it).
Must not fire when a weight is computed from another member's result, or on dots with
differing dimension numbers, dtypes or precision.

``chain``: ``((x @ A) @ B) @ C`` (no nonlinearity between) is recomputed in the
association with the fewest FLOPs for the actual shapes (matrix-chain order).
Identity: matrix multiplication is associative. Fires only if the best order costs at
most ``chain_ratio`` (default 0.8) of the written one. Must not fire when an
intermediate product is read elsewhere (it would be computed twice). Rounding differs
from the written order (float32 sums in another order).
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp
from jax import lax

from graphopt import ir
from graphopt.patterns import DotRule, Match, Rule, View


# On CPU an input this small stays in cache across the dots that read it, so reading it
# once saves little while slicing the fused result costs a pass over it (heads written
# as a loop, x 32 KiB: 0.9x fused; bench/parallel_bench.py).
CPU_CACHE_BYTES = 256 * 1024


def _nbytes(a) -> int:
    return ir.aval_nbytes(a.aval)


# ======================================================================== parallel

def _free_dims(eqn, side):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    c, b = (lc, lb) if side == 0 else (rc, rb)
    return [d for d in range(eqn.invars[side].aval.ndim) if d not in c and d not in b]


class ParallelDots(DotRule):
    """x @ w1, x @ w2, ... ⇒ split(x @ concat(w1, w2, ...))."""

    def __init__(self):
        super().__init__("fuse.parallel_dots")

    def _find(self, view, i, root, side):
        x = root.invars[side]
        if not ir.is_var(x):
            return None
        wfree = _free_dims(root, 1 - side)
        if not wfree:
            return None
        w_axis = wfree[-1]
        key = (root.params["dimension_numbers"], root.params.get("precision"),
               root.params.get("preferred_element_type"))
        wshape = list(root.invars[1 - side].aval.shape)
        users = view.users.get(x, ())
        # A group is found from its last dot only: skip at once unless i is the last dot
        # reading x on this side (keeps a value read by thousands of dots linear, not cubic).
        last = next((j for j in reversed(users) if view.eqns[j].primitive.name == "dot_general"
                     and view.eqns[j].invars[side] is x), None)
        if last != i:
            return None
        members, seen_w = [], set()
        for j in users:
            e = view.eqns[j]
            if e.primitive.name != "dot_general" or e.invars[side] is not x or j > i:
                continue
            w = e.invars[1 - side]
            ws = list(w.aval.shape)
            if (e.params["dimension_numbers"], e.params.get("precision"),
                    e.params.get("preferred_element_type")) != key or w.aval.dtype != root.invars[1 - side].aval.dtype:
                continue
            if len(ws) != len(wshape) or any(a != b for k, (a, b) in enumerate(zip(ws, wshape)) if k != w_axis):
                continue
            if w is x or id(w) in seen_w:
                continue
            seen_w.add(id(w))
            members.append(j)
        members = sorted(set(members))
        if len(members) < 2 or members[-1] != i:
            return None  # found from the last member only, so each group is tried once
        outs = [view.eqns[j].outvars[0] for j in members]
        ws = [view.eqns[j].invars[1 - side] for j in members]
        if view.depends_on(ws, outs, members[0], many=True):
            return None
        mode = view.option("parallel_dots", "auto")
        if mode is False or mode == "never":
            return None
        if mode != "always" and (len(ws) - 1) * _nbytes(x) < 2 * sum(_nbytes(w) for w in ws):
            return None  # concatenating the weights costs more than re-reading x saves
        platform = getattr(view.ctx, "platform", None)
        if mode != "always" and platform == "cpu" and _nbytes(x) <= CPU_CACHE_BYTES:
            view.note(f"fuse_parallel_dots: {len(ws)} dots share a {_nbytes(x)}-byte input "
                      f"that stays in a CPU cache: re-reading it is cheap, slicing the fused "
                      f"result is not (measured 0.9x); left as written")
            return None
        # The result axis that w's free dim becomes: after batch dims and x's free dims.
        nb = len(root.params["dimension_numbers"][1][0])
        n_xfree = len(_free_dims(root, side))
        pos_in_free = wfree.index(w_axis)
        out_axis = nb + (n_xfree + pos_in_free if side == 0 else pos_in_free)
        sizes = [w.aval.shape[w_axis] for w in ws]
        prim, params = root.primitive, dict(root.params)

        def fused(x, *ws):
            wcat = jnp.concatenate(ws, axis=w_axis)
            y = prim.bind(x, wcat, **params) if side == 0 else prim.bind(wcat, x, **params)
            outs, start = [], 0
            for n in sizes:
                outs.append(lax.slice_in_dim(y, start, start + n, axis=out_axis))
                start += n
            return outs

        return Match(self.name, frozenset(members), outs, fused, [x, *ws])


# =========================================================================== chain

def _is_matmul(eqn) -> bool:
    """lhs [..., k] @ rhs [k, n]: contraction of lhs's last dim with rhs's first, no batch."""
    if eqn.primitive.name != "dot_general":
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    return (not lb and not rb and tuple(lc) == (lhs.aval.ndim - 1,) and tuple(rc) == (0,)
            and rhs.aval.ndim == 2 and eqn.params.get("precision") is None)


def _tree(view: View, atom, root_params, eqns, top=False):
    """Expression tree of private matmuls under ``atom``: a leaf atom or (left, right)."""
    e = view.producer_eqn(atom)
    if (e is None or not _is_matmul(e) or (not top and (view.n_uses(atom) != 1 or atom in view.outputs))
            or e.params.get("preferred_element_type") != root_params.get("preferred_element_type")):
        return atom
    eqns.add(view.producer[atom])
    return (_tree(view, e.invars[0], root_params, eqns), _tree(view, e.invars[1], root_params, eqns))


def _leaves(t) -> list:
    return _leaves(t[0]) + _leaves(t[1]) if isinstance(t, tuple) else [t]


def _tree_cost(t, dims, start=0):
    """(flops, n_leaves) of evaluating tree ``t`` whose leaves start at index ``start``."""
    if not isinstance(t, tuple):
        return 0.0, 1
    fl, nl = _tree_cost(t[0], dims, start)
    fr, nr = _tree_cost(t[1], dims, start + nl)
    return fl + fr + 2.0 * dims[start] * dims[start + nl] * dims[start + nl + nr], nl + nr


def chain_order(dims: list[int]):
    """Matrix-chain DP over dims p0..pn: (min FLOPs, split table)."""
    n = len(dims) - 1
    cost = np.zeros((n, n))
    split = np.zeros((n, n), dtype=int)
    for length in range(2, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            cost[a, b] = np.inf
            for k in range(a, b):
                c = cost[a, k] + cost[k + 1, b] + 2.0 * dims[a] * dims[k + 1] * dims[b + 1]
                if c < cost[a, b]:
                    cost[a, b], split[a, b] = c, k
    return float(cost[0, n - 1]), split


class MatmulChain(Rule):
    """(x @ A) @ B ... ⇒ the association with the fewest FLOPs."""

    def __init__(self):
        super().__init__("fuse.matmul_chain", roots=("dot_general",))

    def find(self, view: View, i: int) -> Match | None:
        root = view.eqns[i]
        if not _is_matmul(root):
            return None
        eqns: set = set()
        tree = _tree(view, root.outvars[0], root.params, eqns, top=True)
        leaves = _leaves(tree)
        if len(leaves) < 3 or any(l.aval.ndim != 2 for l in leaves[1:]):
            return None
        if len({l.aval.dtype for l in leaves}) != 1:
            return None
        lead = leaves[0].aval.shape[:-1]
        dims = [int(np.prod(lead, dtype=np.int64)), leaves[0].aval.shape[-1]] + \
            [l.aval.shape[1] for l in leaves[1:]]
        now, _ = _tree_cost(tree, dims)
        best, split = chain_order(dims)
        if best > view.option("chain_ratio", 0.8) * now:
            return None
        pet = root.params.get("preferred_element_type")

        def build(ops, a, b):
            if a == b:
                return ops[a]
            k = split[a, b]
            x, y = build(ops, a, k), build(ops, k + 1, b)
            return lax.dot_general(x, y, (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=pet)

        def fused(*ops):
            return build(ops, 0, len(ops) - 1)

        m = Match(self.name, frozenset(eqns), [root.outvars[0]], fused, leaves)
        m.note = f"{now:.3g} -> {best:.3g} FLOPs"
        return m


PARALLEL_RULES = [ParallelDots()]
CHAIN_RULES = [MatmulChain()]

__all__ = ["ParallelDots", "MatmulChain", "chain_order", "PARALLEL_RULES", "CHAIN_RULES"]
