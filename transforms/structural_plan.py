"""The result of structural pruning: which channels of which groups stay, and how to slice.

A :class:`PrunePlan` slices the params (and any pytree holding param-shaped copies, such
as an optax state) with ``plan.apply``, runs the smaller model with ``plan.function`` and
prints the groups, channels removed, params and FLOPs before/after.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from graphopt import ir
from graphopt.errors import GraphoptError

from . import structural_groups as sg


class PruningError(GraphoptError, ValueError):
    """Structural pruning cannot do what was asked; the message names the argument or weight."""


def path_str(keypath) -> str:
    """``layers/0/w`` for the pytree key path of a weight."""
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@dataclasses.dataclass
class PrunePlan:
    """Channels kept per group; see the module docstring."""

    apply_fn: object
    treedef: object
    paths: list
    shapes: list            # original shape of every param leaf
    analysis: sg.Analysis
    kept: dict              # group atom -> sorted kept channel indices
    dead: dict              # group atom -> number of removed channels that were provably dead
    criterion: str
    sparsity: float
    flops: tuple = (0.0, 0.0)   # before, after (graphopt.cost on the jaxpr)
    notes: list = dataclasses.field(default_factory=list)
    runner: object = None   # set when apply itself rejects the new shapes (replayed jaxpr)

    # ------------------------------------------------------------------ slicing
    @property
    def groups(self) -> list:
        return [g for g in self.analysis.groups if g.atom in self.kept]

    @property
    def refused(self) -> list:
        return [g for g in self.analysis.groups if not g.prunable]

    def _index(self, leaf: int) -> list:
        return [sg.axis_index(self.analysis, leaf, k, self.kept) for k in range(len(self.shapes[leaf]))]

    def new_shapes(self) -> list:
        return [tuple(len(i) if i is not None else d for i, d in zip(self._index(n), s))
                for n, s in enumerate(self.shapes)]

    def slice_leaf(self, leaf: int, x):
        if tuple(np.shape(x)) != tuple(self.shapes[leaf]):
            raise PruningError(f"plan.apply: {self.paths[leaf]} has shape {np.shape(x)}, "
                               f"the plan was made for {tuple(self.shapes[leaf])}")
        idxs = self._index(leaf)
        if all(i is None for i in idxs):
            return x
        if ir.is_tracer(x):  # inside jit/grad: slice with JAX
            for k, idx in enumerate(idxs):
                x = x if idx is None else jnp.take(x, jnp.asarray(idx), axis=k)
            return x
        y = np.asarray(x)  # concrete: slice on the host (no compile per shape)
        for k, idx in enumerate(idxs):
            y = y if idx is None else np.take(y, idx, axis=k)
        return jnp.asarray(y, dtype=x.dtype)

    def _slice_params(self, tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return jax.tree_util.tree_unflatten(self.treedef, [self.slice_leaf(i, x) for i, x in enumerate(leaves)])

    def apply(self, tree):
        """Slice ``tree``: the params, or any pytree (an optax state) holding copies of them.

        Every subtree with the params' structure is sliced like the params; other leaves
        stay. A leaf outside such a subtree with a pruned weight's shape is refused, since
        which weight it belongs to is ambiguous.
        """
        def is_params(node):
            return jax.tree_util.tree_structure(node) == self.treedef

        if is_params(tree):
            return self._slice_params(tree)
        out = jax.tree_util.tree_map(lambda n: self._slice_params(n) if is_params(n) else n,
                                     tree, is_leaf=is_params)
        changed = {tuple(s) for s, n in zip(self.shapes, self.new_shapes()) if tuple(s) != n}
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_params)[0]:
            if not is_params(leaf) and tuple(np.shape(leaf)) in changed:
                raise PruningError(f"plan.apply: leaf {path_str(kp)} has the shape "
                                   f"{tuple(np.shape(leaf))} of a pruned weight but is not inside a "
                                   "copy of the params pytree; slice it with plan.slice_leaf")
        return out

    @property
    def function(self):
        """The model on the pruned params (plain JAX: jit, grad and vmap apply)."""
        new = [tuple(s) for s in self.new_shapes()]

        def pruned(params, *args, **kwargs):
            got = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)]
            if got != new:
                bad = next(p for p, g, n in zip(self.paths, got, new) if g != n)
                raise PruningError(f"plan.function: weight {bad} does not have its pruned shape; "
                                   "pass plan.apply(params)")
            return (self.runner or self.apply_fn)(params, *args, **kwargs)

        return pruned

    # ------------------------------------------------------------------ reporting
    def param_counts(self) -> tuple[int, int]:
        return (sum(int(np.prod(s)) for s in self.shapes), sum(int(np.prod(s)) for s in self.new_shapes()))

    def channels(self) -> tuple[int, int]:
        before = sum(g.size for g in self.groups)
        return before, sum(len(self.kept[g.atom]) for g in self.groups)

    def __str__(self) -> str:
        p0, p1 = self.param_counts()
        c0, c1 = self.channels()
        lines = [f"PrunePlan ({self.criterion}, sparsity {self.sparsity:g}): "
                 f"{len(self.groups)} groups pruned, channels {c0} -> {c1}",
                 f"  params {p0:,} -> {p1:,} ({p1 / max(p0, 1):.1%}); "
                 f"FLOPs {self.flops[0]:,.0f} -> {self.flops[1]:,.0f} "
                 f"({self.flops[1] / max(self.flops[0], 1):.1%})"]
        for g in self.groups:
            k = len(self.kept[g.atom])
            ws = ", ".join(f"{m.path}:{m.axis}" for m in g.members)
            lines.append(f"  group {g.name()}: {g.size} -> {k} (dead {self.dead.get(g.atom, 0)}) [{ws}]")
        for g in self.refused:
            if not g.reason.startswith("reaches the function"):
                lines.append(f"  not pruned {g.name()} ({g.size}): {g.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__

    def measure(self, params, *args, repeats: int = 50) -> dict:
        """Median seconds of the jitted model before and after pruning (``params`` unpruned)."""
        small = self.apply(params)
        out = {}
        for name, fn, p in (("before", self.apply_fn, params), ("after", self.function, small)):
            f = jax.jit(fn)
            jax.block_until_ready(f(p, *args))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                jax.block_until_ready(f(p, *args))
                times.append(time.perf_counter() - t)
            out[name] = statistics.median(times)
        out["speedup"] = out["before"] / out["after"]
        return out
