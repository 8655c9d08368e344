"""Structural pruning: remove channels, hidden units and attention heads so shapes shrink.

``prune_channels(apply, params, x, sparsity=0.5, criterion="l2")`` traces
``apply(params, x)``, finds the dependency groups of every weight axis in the jaxpr
(:mod:`.structural_groups`: a channel is followed through elementwise ops, biases, norm
scale/offset/running stats, residual adds, head-splitting reshapes, into every weight that
reads it) and picks channels to drop per group, all of a group's weights together.

Exact part: channels whose consuming weights are all zero, or whose incoming weights (and
biases, norm parameters) are all zero and whose value is zero on the example input, are
removed first; outputs do not change. Approximate part: the lowest-scoring channels by
``l1``/``l2`` magnitude or a first-order ``taylor`` estimate ``(sum w * dL/dw)^2`` over a
few batches, per group (``scope="layer"``) or ranked across groups (``"global"``).

It must not (and does not) prune an axis that reaches the function's inputs or outputs,
is reduced over (LayerNorm's feature axis, a softmax), is contracted between two
activations (q.k: its size sets the attention scale), or meets a primitive without a rule
(gather, scan, concatenate, ...): those are listed in the plan with the reason.
``plan.function`` re-runs ``apply`` on the smaller params, so ``apply`` must read its sizes
from the param shapes (zoo, flax and equinox models do).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from graphopt import cost

from . import structural_groups as sg
from .structural_plan import PrunePlan, PruningError, path_str
from .structural_replay import replayed

__all__ = ["prune_channels", "PrunePlan", "PruningError"]

CRITERIA = ("l1", "l2", "taylor")
SCOPES = ("layer", "global")


def _check_args(sparsity, criterion, scope, loss_fn, batches):
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise PruningError(f"prune_channels: sparsity must be a number in [0, 1), got {sparsity!r}")
    if criterion not in CRITERIA:
        raise PruningError(f"prune_channels: criterion must be one of {CRITERIA}, got {criterion!r}")
    if scope not in SCOPES:
        raise PruningError(f"prune_channels: scope must be one of {SCOPES}, got {scope!r}")
    if criterion == "taylor" and (loss_fn is None or not batches):
        raise PruningError("prune_channels: criterion='taylor' needs loss_fn(params, batch) and "
                           "batches (a non-empty list of batches)")


def _norm_path(p: str) -> str:
    return p.strip("/").replace(".", "/")


def _select_groups(analysis, include):
    prunable = [g for g in analysis.groups if g.prunable]
    if include is None:
        return prunable
    chosen = []
    for want in include:
        w = _norm_path(want)
        mine = [g for g in analysis.groups if any(m.path == w for m in g.members)]
        if not mine:
            raise PruningError(f"prune_channels: include names {want!r}, which is not a weight "
                               f"(weights: {sorted({m.path for g in analysis.groups for m in g.members})})")
        ok = [g for g in mine if g.prunable]
        if not ok:
            why = "; ".join(f"axis {m.axis}: {g.reason}" for g in mine for m in g.members if m.path == w)
            raise PruningError(f"prune_channels: no axis of weight {w} can be followed: {why}")
        chosen += [g for g in ok if g not in chosen]
    return chosen


def _scored_members(g, leaves, criterion):
    if criterion == "taylor":
        return g.members
    # magnitude of kernels only: a norm's running variance or a bias is no importance
    kernels = [m for m in g.members if np.ndim(leaves[m.leaf]) > 1]
    return kernels or g.members


def _scores(analysis, groups, leaves, criterion, grad_leaves):
    out = {}
    for g in groups:
        s = np.zeros(g.size)
        for m in _scored_members(g, leaves, criterion):
            w = leaves[m.leaf]
            if criterion == "taylor":
                for gl in grad_leaves:  # (sum over a channel's weights of w * dL/dw)^2 per batch
                    wg = np.asarray(w) * np.asarray(gl[m.leaf])
                    s += sg.channel_view(analysis, m.leaf, m.axis, g.atom, wg).sum(1) ** 2
            else:
                v = sg.channel_view(analysis, m.leaf, m.axis, g.atom, w)
                s += np.abs(v).sum(1) if criterion == "l1" else np.square(v).sum(1)
        out[g.atom] = s
    return out


def _zero_rows(analysis, g, leaves, consumer):
    rows = [np.all(sg.channel_view(analysis, m.leaf, m.axis, g.atom, leaves[m.leaf]) == 0, axis=1)
            for m in g.members if m.consumer == consumer]
    return np.logical_and.reduce(rows) if rows else np.zeros(g.size, bool)


def _dead(analysis, groups, leaves, treedef, apply, x):
    """Channels provably dead: zero consumer weights, or zero incoming weights and value."""
    dead = {g.atom: _zero_rows(analysis, g, leaves, True) for g in groups}
    maybe = {g.atom: _zero_rows(analysis, g, leaves, False) & ~dead[g.atom] for g in groups}
    if any(m.any() for m in maybe.values()):
        # zero in, so the channel is a constant; zeroing what reads it shows whether it is 0
        new = list(leaves)
        for g in groups:
            if maybe[g.atom].any():
                for m in g.members:
                    if m.consumer:
                        idx = sg.axis_index(analysis, m.leaf, m.axis, {g.atom: np.flatnonzero(~maybe[g.atom])})
                        keep = np.zeros(new[m.leaf].shape[m.axis], bool)
                        keep[idx] = True
                        shape = [1] * new[m.leaf].ndim
                        shape[m.axis] = -1
                        new[m.leaf] = new[m.leaf] * keep.reshape(shape)
        run = jax.jit(apply)
        a = run(jax.tree_util.tree_unflatten(treedef, leaves), x)
        b = run(jax.tree_util.tree_unflatten(treedef, new), x)
        if all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))):
            for k in dead:
                dead[k] = dead[k] | maybe[k]
    return dead


def _choose(groups, scores, dead, sparsity, scope):
    n_remove = {}
    if scope == "layer":
        for g in groups:
            n_remove[g.atom] = min(g.size - 1, max(int(dead[g.atom].sum()), int(math.floor(sparsity * g.size))))
    else:
        ranked = []
        for g in groups:  # per-group normalisation so wide and narrow layers compare
            s = scores[g.atom] / (scores[g.atom].mean() + 1e-12)
            ranked += [(-1.0 if dead[g.atom][c] else s[c], g.atom, c) for c in range(g.size)]
        ranked.sort()
        budget = int(math.floor(sparsity * sum(g.size for g in groups)))
        size = {g.atom: g.size for g in groups}
        n_remove = {g.atom: 0 for g in groups}
        for s, a, _ in ranked:
            if (budget <= 0 and s >= 0) or n_remove[a] >= size[a] - 1:
                continue
            n_remove[a] += 1
            budget -= 1
    kept = {}
    for g in groups:
        order = np.argsort(np.where(dead[g.atom], -np.inf, scores[g.atom]), kind="stable")
        kept[g.atom] = np.sort(order[n_remove[g.atom]:])
    return kept


def prune_channels(apply, params, example_input, *, sparsity=0.5, criterion="l2", scope="layer",
                   loss_fn=None, batches=None, include=None) -> PrunePlan:
    """Plan that removes ``sparsity`` of the channels of every prunable group of ``params``.

    ``apply(params, example_input)`` is traced once. ``criterion``: ``"l1"``, ``"l2"``
    (magnitude of the kernels a channel touches) or ``"taylor"`` (needs
    ``loss_fn(params, batch)`` and ``batches``). ``scope``: ``"layer"`` (each group loses
    ``floor(sparsity * size)``) or ``"global"`` (normalised scores ranked across groups).
    ``include``: weight paths (``"layers/0/w"``); only groups containing one are pruned,
    and a weight none of whose axes can be followed is an error naming it.
    Dead channels are always removed; ``sparsity=0`` removes only those (exact).
    """
    _check_args(sparsity, criterion, scope, loss_fn, batches)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [x for _, x in flat]
    for p, x in zip(paths, leaves):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise PruningError(f"prune_channels: params leaf {p} is {type(x).__name__}, not an array")
    try:
        cj = jax.make_jaxpr(apply)(params, example_input)
    except Exception as e:  # noqa: BLE001 - report the user's function failing, with its cause
        raise PruningError(f"prune_channels: apply(params, example_input) failed to trace: {e}") from e
    analysis = sg.analyze(cj, len(leaves), paths)
    groups = _select_groups(analysis, include)
    if not groups:
        why = "; ".join(f"{g.name()}: {g.reason}" for g in analysis.groups
                        if not g.reason.startswith("reaches the function"))
        raise PruningError(f"prune_channels: no prunable channel group in params ({why})")
    grads = []
    if criterion == "taylor":
        gfn = jax.jit(jax.grad(loss_fn))
        grads = [jax.tree_util.tree_leaves(gfn(params, b)) for b in batches]
    scores = _scores(analysis, groups, leaves, criterion, grads)
    dead = _dead(analysis, groups, leaves, treedef, apply, example_input)
    kept = _choose(groups, scores, dead, float(sparsity), scope)
    n_dead = {g.atom: int((dead[g.atom] & ~np.isin(np.arange(g.size), kept[g.atom])).sum()) for g in groups}
    plan = PrunePlan(apply, treedef, paths, [tuple(x.shape) for x in leaves], analysis, kept, n_dead,
                     criterion, float(sparsity))
    small = plan.apply(params)
    out_big = jax.eval_shape(apply, params, example_input)
    try:
        out_small = jax.eval_shape(apply, small, example_input)
    except Exception as e:  # noqa: BLE001 - the model checks its shapes (flax linen): replay the jaxpr
        plan.runner = replayed(analysis, kept, jax.tree_util.tree_structure(out_big))
        plan.notes.append(f"apply rejects the new shapes ({type(e).__name__}); plan.function replays "
                          "the traced jaxpr at the pruned shapes")
        try:
            out_small = jax.eval_shape(plan.runner, small, example_input)
        except Exception as e2:  # noqa: BLE001
            raise PruningError("prune_channels: neither apply nor its replayed jaxpr runs on the pruned "
                               f"params ({type(e).__name__}: {e}; {type(e2).__name__}: {e2})") from e2
    if jax.tree_util.tree_structure(out_small) != jax.tree_util.tree_structure(out_big) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(out_small), jax.tree_util.tree_leaves(out_big))):
        raise PruningError("prune_channels: apply's output shape changed on the pruned params")
    plan.flops = (cost.program_cost(cj).flops,
                  cost.program_cost(jax.make_jaxpr(plan.runner or apply)(small, example_input)).flops)
    return plan
